//! Statement classification: is this text a read, a write, or the end of a transaction?
//!
//! Looks only at tokens: comments, string literals, quoted identifiers and dollar-quoted bodies
//! are skipped, so a keyword inside them counts for nothing. A multi-statement string is as
//! strong as its strongest statement. Anything not recognised as a read is a write: a wrong
//! "write" costs a shorter deadline, a wrong "read" could hang a client behind a stuck commit.

/// What a statement does, as far as its text tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Read,
    /// COMMIT, END or PREPARE TRANSACTION: a write if the transaction wrote, else a read.
    Commit,
    Write,
}

/// Classifies statement text. `complete` is false when only a prefix of the text was seen;
/// then anything that looks like a read is taken as a write, since the unseen rest could write.
pub fn classify(sql: &[u8], complete: bool) -> Kind {
    // Most texts are one statement, perhaps ending in a semicolon: then no pass is needed to
    // find where statements end. (A lone final semicolon inside an unterminated string or
    // comment hides no tokens either.) One byte scan finds the first semicolon and whether a
    // SELECT could be a write; whitespace after the semicolon holds no word.
    let scan = scan(sql);
    let kind = match scan.semicolon {
        None => classify_statement(sql, Some(scan.write_word)),
        Some(at) if sql[at + 1..].iter().all(u8::is_ascii_whitespace) => {
            classify_statement(&sql[..at], Some(scan.write_word))
        }
        Some(_) => classify_statements(sql),
    };
    if !complete && kind == Kind::Read {
        Kind::Write
    } else {
        kind
    }
}

/// The longest text [`Memo`] keeps.
const MEMO_LIMIT: usize = 1024;

/// The last text classified and what it was, so a client that sends the same text again and
/// again (an unnamed statement parsed for every execution, as `pgbench -M extended` and many
/// drivers do) pays for one comparison instead of a classification. A text that differs from
/// the remembered one only in its numbers (`... WHERE id = 42` after `... WHERE id = 7`, as
/// a query with its literals written in sends) is the same statement to the classifier, which
/// never looks at a number's digits: see [`number_runs`] and [`same_but_numbers`]. Holds at
/// most [`MEMO_LIMIT`] bytes of text, and nothing once [`Memo::release`]d.
#[derive(Debug, Default)]
pub struct Memo {
    /// The text, then where its numbers are: [`number_runs`] as pairs of little-endian `u16`
    /// (start, end), found once when the text is remembered.
    text: Vec<u8>,
    /// How many bytes of `text` are the text.
    len: u16,
    complete: bool,
    kind: Option<Kind>,
}

impl Memo {
    /// [`classify`], remembered.
    #[inline(always)]
    pub fn classify(&mut self, sql: &[u8], complete: bool) -> Kind {
        if let Some(kind) = self.kind
            && complete == self.complete
        {
            let (text, runs) = self.text.split_at(usize::from(self.len));
            if same_but_numbers(text, runs, sql) {
                return kind;
            }
        }
        let kind = classify(sql, complete);
        if sql.len() <= MEMO_LIMIT {
            self.text.clear();
            self.text.extend_from_slice(sql);
            number_runs(sql, &mut self.text);
            self.len = sql.len() as u16; // MEMO_LIMIT fits
            self.complete = complete;
            self.kind = Some(kind);
        }
        kind
    }

    /// The remembered text.
    #[cfg(test)]
    fn text(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }

    /// Gives the memory back, for an idle session.
    pub fn release(&mut self) {
        *self = Memo::default();
    }
}

/// Appends to `out` where `text`'s numbers are: each run of ASCII digits that starts the text
/// or follows a byte that cannot continue a word (so the run is a number of its own, not part
/// of an identifier, a keyword, a `$n` parameter or a dollar-quote tag), as two little-endian
/// `u16`, where it starts and where it ends. `text` is at most [`MEMO_LIMIT`] bytes.
/// Eight bytes without a digit are passed over at once: a text the memo has not seen costs
/// about a byte's worth of work per eight bytes more than its classification.
fn number_runs(text: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < text.len() {
        if i + 8 <= text.len() {
            let digits = !not_digits(text, i) & (EACH * 0x80);
            if digits == 0 {
                i += 8;
                continue;
            }
            i += (digits.trailing_zeros() / 8) as usize;
        } else if !text[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A digit: the run it starts is a number unless it continues a word.
        let end = digits_end(text, i);
        if i == 0 || !WORD_BYTE[usize::from(text[i - 1])] {
            out.extend_from_slice(&(i as u16).to_le_bytes());
            out.extend_from_slice(&(end as u16).to_le_bytes());
        }
        i = end;
    }
}

/// Whether `sql` is `text` but for the digits of its numbers (`runs`, from [`number_runs`]):
/// where `text` has a number, `sql` has a run of digits of any length; everything else is the
/// same. Classification reads a run of digits as one token whatever its digits (and inside a
/// string, a quoted identifier or a comment, digits are just content), so two such texts
/// classify alike. Each stretch between numbers is compared eight bytes at a time.
#[inline]
fn same_but_numbers(text: &[u8], runs: &[u8], sql: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    for run in runs.chunks_exact(4) {
        let start = usize::from(u16::from_le_bytes([run[0], run[1]]));
        let end = usize::from(u16::from_le_bytes([run[2], run[3]]));
        let to = j + (start - i);
        if to >= sql.len() || !same(&text[i..start], &sql[j..to]) {
            return false;
        }
        // The same byte precedes both runs, so `sql`'s is a number too.
        let digits = digits_end(sql, to);
        if digits == to {
            return false;
        }
        (i, j) = (end, digits);
    }
    same(&text[i..], &sql[j..])
}

/// Eight bytes each way.
const EACH: u64 = 0x0101_0101_0101_0101;

/// The top bit of each of the eight bytes of `t` from `from` that is not an ASCII digit. A byte
/// is a digit when, XORed with `0`, it is below ten; adding 0x76 to its low seven bits sets its
/// top bit exactly when they are ten or more (no carry leaves the byte), and a byte of 0x80 or
/// more has its top bit set already.
#[inline]
fn not_digits(t: &[u8], from: usize) -> u64 {
    let x = u64::from_le_bytes(t[from..from + 8].try_into().expect("eight bytes")) ^ (EACH * 0x30);
    (((x & (EACH * 0x7f)) + EACH * 0x76) | x) & (EACH * 0x80)
}

/// Where the run of ASCII digits from `at` in `t` ends. Eight bytes at a time.
#[inline]
fn digits_end(t: &[u8], mut at: usize) -> usize {
    let not_digits = |from: usize| not_digits(t, from);
    while at + 8 <= t.len() {
        let flags = not_digits(at);
        if flags != 0 {
            return at + (flags.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    if at < t.len() && t.len() >= 8 {
        // The last eight bytes, those before `at` shifted out.
        let from = t.len() - 8;
        let flags = not_digits(from) >> (8 * (at - from));
        return if flags == 0 {
            t.len()
        } else {
            at + (flags.trailing_zeros() / 8) as usize
        };
    }
    while at < t.len() && t[at].is_ascii_digit() {
        at += 1;
    }
    at
}

/// Whether `a` and `b` are the same bytes: eight at a time, the last look at the last eight
/// overlapping bytes already compared (four, then one at a time, for short ones).
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n >= 8 {
        let word = |t: &[u8]| u64::from_le_bytes(t.try_into().expect("eight bytes"));
        let words = a.chunks_exact(8).zip(b.chunks_exact(8));
        return words.into_iter().all(|(x, y)| word(x) == word(y))
            && word(&a[n - 8..]) == word(&b[n - 8..]);
    }
    let half = |t: &[u8], at: usize| u32::from_le_bytes(t[at..at + 4].try_into().expect("four"));
    if n >= 4 {
        return half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// Classifies each statement of a multi-statement text; the strongest wins.
fn classify_statements(sql: &[u8]) -> Kind {
    let mut kind = Kind::Read;
    let mut tokens = Tokens::new(sql);
    let mut start = 0;
    loop {
        let token = tokens.next();
        if matches!(token, None | Some(Token::Semicolon)) {
            let end = if token.is_none() {
                sql.len()
            } else {
                tokens.at - 1
            };
            kind = kind.max(classify_statement(&sql[start..end], None));
            start = tokens.at;
            if token.is_none() {
                return kind;
            }
        }
    }
}

/// Statements that end or rewind a transaction block, which is what a failed block accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// ROLLBACK or ABORT (not PREPARED).
    Rollback,
    /// ROLLBACK TO [SAVEPOINT] name.
    RollbackTo,
    /// COMMIT or END (not PREPARED): in a failed block, PostgreSQL rolls back instead.
    Commit,
}

/// Whether `sql` is a single ROLLBACK, ROLLBACK TO or COMMIT statement.
pub fn transaction_control(sql: &[u8]) -> Option<Control> {
    let mut tokens = Tokens::new(sql);
    let first = tokens.next()?;
    let mut rest = tokens.filter(|t| *t != Token::Semicolon);
    let second = rest.next();
    let is_to = second.is_some_and(|t| t.is("TO"));
    let plain = second.is_none() || second.is_some_and(|t| t.is("WORK") || t.is("TRANSACTION"));
    if first.is("ROLLBACK") && is_to {
        Some(Control::RollbackTo)
    } else if (first.is("ROLLBACK") || first.is("ABORT")) && plain {
        Some(Control::Rollback)
    } else if (first.is("COMMIT") || first.is("END")) && plain {
        Some(Control::Commit)
    } else {
        None
    }
}

/// Settings PostgreSQL reports in ParameterStatus when they change, which a client may set:
/// bulkhead follows them from the reports, so setting one ties a client to no backend.
pub const REPORTED_SETTINGS: [&str; 7] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

/// Functions whose effect outlives the transaction: session advisory locks, and set_config
/// (which may set a session-wide setting bulkhead cannot follow).
const SESSION_FUNCTIONS: [&str; 5] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "set_config",
];

/// Whether `sql` uses a feature whose state lives in its backend beyond the transaction
/// (LISTEN, SQL PREPARE, LOAD, a cursor WITH HOLD, a temporary object, a session advisory
/// lock, a SET or RESET of a setting PostgreSQL does not report, DISCARD, DEALLOCATE, SET
/// ROLE): in transaction pooling the client must keep that backend. Names the feature.
/// Conservative: a false "yes" only pins a client; a quoted identifier hides a function name.
pub fn session_feature(sql: &[u8]) -> Option<&'static str> {
    let mut tokens = Tokens::new(sql);
    let mut statement: [Option<Token<'_>>; 4] = [None; 4];
    let mut n = 0;
    let mut hold = (false, false); // DECLARE ... WITH HOLD
    while let Some(t) = tokens.next() {
        if t == Token::Semicolon {
            if let Some(f) = statement_feature(&statement[..n], hold) {
                return Some(f);
            }
            n = 0;
            hold = (false, false);
            continue;
        }
        if n < statement.len() {
            statement[n] = Some(t);
            n += 1;
        }
        if let Token::Word(w) = t {
            if SESSION_FUNCTIONS
                .iter()
                .any(|f| w.eq_ignore_ascii_case(f.as_bytes()))
                && tokens.clone().next() == Some(Token::Open)
            {
                return Some(if w.eq_ignore_ascii_case(b"set_config") {
                    "set_config"
                } else {
                    "a session advisory lock"
                });
            }
            if t.is("WITH") {
                hold.0 = true;
            } else if hold.0 && t.is("HOLD") {
                hold.1 = true;
            } else {
                hold.0 = false;
            }
        }
    }
    statement_feature(&statement[..n], hold)
}

/// The rule for one statement's first tokens.
fn statement_feature(t: &[Option<Token<'_>>], hold: (bool, bool)) -> Option<&'static str> {
    let word = |i: usize, k: &str| t.get(i).copied().flatten().is_some_and(|t| t.is(k));
    let reported = |i: usize| match t.get(i).copied().flatten() {
        Some(Token::Word(w)) => REPORTED_SETTINGS
            .iter()
            .any(|s| w.eq_ignore_ascii_case(s.as_bytes())),
        _ => false,
    };
    if word(0, "LISTEN") {
        Some("LISTEN")
    } else if word(0, "PREPARE") && !word(1, "TRANSACTION") {
        Some("PREPARE")
    } else if word(0, "LOAD") {
        Some("LOAD")
    } else if word(0, "DISCARD") {
        Some("DISCARD")
    } else if word(0, "DEALLOCATE") {
        Some("DEALLOCATE")
    } else if word(0, "DECLARE") && hold.1 {
        Some("a cursor WITH HOLD")
    } else if word(0, "CREATE")
        && (word(1, "TEMP")
            || word(1, "TEMPORARY")
            || ((word(1, "GLOBAL") || word(1, "LOCAL"))
                && (word(2, "TEMP") || word(2, "TEMPORARY"))))
    {
        Some("a temporary object")
    } else if word(0, "SET") {
        let at = if word(1, "SESSION") && !word(2, "AUTHORIZATION") && !word(2, "CHARACTERISTICS") {
            2
        } else {
            1
        };
        let transaction_only = word(1, "LOCAL") || word(1, "TRANSACTION") || word(1, "CONSTRAINTS");
        let followed =
            reported(at) || word(at, "NAMES") || (word(at, "TIME") && word(at + 1, "ZONE"));
        if transaction_only || followed {
            None
        } else {
            Some("SET of a setting PostgreSQL does not report")
        }
    } else if word(0, "RESET") {
        if reported(1) || (word(1, "TIME") && word(2, "ZONE")) {
            None
        } else {
            Some("RESET")
        }
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    Open,
    Close,
    Semicolon,
    /// Literals, quoted identifiers, parameters, operators: anything that is not a keyword.
    Other,
}

impl Token<'_> {
    fn is(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(keyword.as_bytes()))
    }
}

/// Classifies one statement (no top-level semicolons). Scans its text again for each rule
/// instead of collecting tokens, so classification allocates nothing. `write_word`: what
/// [`scan`] found, if the caller scanned this text already.
fn classify_statement(text: &[u8], write_word: Option<bool>) -> Kind {
    // The commonest first word, known without the tokenizer: SELECT and then anything that
    // is not part of the word (all a tokenizer would conclude too).
    if text.len() > 6
        && text[..6].eq_ignore_ascii_case(b"SELECT")
        && !WORD_BYTE[usize::from(text[6])]
    {
        return select_like(text, false, write_word);
    }
    // Leading parentheses: "(SELECT 1) UNION (SELECT 2)".
    let mut tokens = Tokens::new(text).skip_while(|t| *t == Token::Open);
    let Some(first) = tokens.next() else {
        return Kind::Read;
    };
    // Only a few first words need the second: it is not read for the rest.
    let mut second_is = |k: &str| tokens.next().is_some_and(|t| t.is(k));
    let Token::Word(word) = first else {
        return Kind::Write;
    };
    let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
    if is("SELECT") || is("VALUES") || is("TABLE") || is("DECLARE") {
        select_like(text, is("DECLARE"), write_word)
    } else if is("WITH") {
        let writes = Tokens::new(text)
            .any(|t| t.is("INSERT") || t.is("UPDATE") || t.is("DELETE") || t.is("MERGE"));
        if writes {
            Kind::Write
        } else {
            select_like(text, false, write_word)
        }
    } else if is("EXPLAIN") {
        explain(text)
    } else if is("COPY") {
        copy(text)
    } else if is("COMMIT") || is("END") {
        // COMMIT PREPARED finishes a prepared transaction: always a write.
        if second_is("PREPARED") {
            Kind::Write
        } else {
            Kind::Commit
        }
    } else if is("PREPARE") && second_is("TRANSACTION") {
        Kind::Commit
    } else if is("ROLLBACK") || is("ABORT") {
        if second_is("PREPARED") {
            Kind::Write
        } else {
            Kind::Read
        }
    } else if [
        "SHOW",
        "SET",
        "RESET",
        "BEGIN",
        "START",
        "SAVEPOINT",
        "RELEASE",
        "FETCH",
        "MOVE",
        "CLOSE",
        "LISTEN",
        "UNLISTEN",
        "DISCARD",
        "DEALLOCATE",
        "PREPARE",
    ]
    .iter()
    .any(|k| is(k))
    {
        Kind::Read
    } else {
        Kind::Write
    }
}

/// SELECT and its relatives read, unless they lock rows (FOR UPDATE / SHARE), create a table
/// (SELECT INTO), or call a sequence function. `write_word`: [`scan`]'s finding, if known.
fn select_like(text: &[u8], cursor: bool, write_word: Option<bool>) -> Kind {
    if !write_word.unwrap_or_else(|| scan(text).write_word) {
        return Kind::Read;
    }
    let mut tokens = Tokens::new(text).peekable();
    while let Some(t) = tokens.next() {
        let next = tokens.peek().copied();
        let locks = t.is("FOR")
            && next.is_some_and(|n| n.is("UPDATE") || n.is("SHARE") || n.is("NO") || n.is("KEY"));
        let creates = t.is("INTO") && !cursor;
        let sequence = (t.is("NEXTVAL") || t.is("SETVAL")) && next == Some(Token::Open);
        if locks || creates || sequence {
            return Kind::Write;
        }
    }
    Kind::Read
}

/// What one byte scan of a text finds.
#[derive(Debug, PartialEq, Eq)]
struct Scan {
    /// Where the first semicolon is (perhaps inside a string or comment).
    semicolon: Option<usize>,
    /// Whether the text holds, in any case, one of the letter runs FOR, INTO or VAL (of
    /// NEXTVAL and SETVAL) that can make a SELECT a write. Several times cheaper than
    /// tokenizing, it clears most reads; a hit (perhaps inside a string or a longer word) goes
    /// on to the token scan, so it can only ever send a statement the long way.
    write_word: bool,
}

/// Scans `text` until it has found both a semicolon and a write word or reached the end:
/// sixteen bytes at a time where SSE2 is there (every x86-64), else eight.
fn scan(text: &[u8]) -> Scan {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    if text.len() >= 16 {
        // SAFETY: the build targets SSE2 (x86-64's baseline), checked by the cfg above.
        return unsafe { scan_sse2(text) };
    }
    scan_words(text)
}

/// Whether the byte at `i` of `text` is the O of FOR or INTO, or the V of VAL, in any case.
#[inline(always)]
fn write_word_at(text: &[u8], i: usize) -> bool {
    let lower = |i: usize| text.get(i).map_or(0, |b| b | 0x20);
    match lower(i) {
        b'o' => {
            (i >= 1 && lower(i - 1) == b'f' && lower(i + 1) == b'r')
                || (i >= 3 && lower(i - 3) == b'i' && lower(i - 2) == b'n' && lower(i - 1) == b't')
        }
        b'v' => lower(i + 1) == b'a' && lower(i + 2) == b'l',
        _ => false,
    }
}

/// [`scan`] for texts of sixteen bytes or more, a vector compare per sixteen bytes. The last
/// block is the text's last sixteen bytes, its bytes already looked at masked off.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[target_feature(enable = "sse2")]
fn scan_sse2(text: &[u8]) -> Scan {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_set_epi64x, _mm_set1_epi8,
    };
    let mut out = Scan {
        semicolon: None,
        write_word: false,
    };
    let mut at = 0;
    while at < text.len() {
        let start = at.min(text.len() - 16);
        let block = u128::from_le_bytes(text[start..start + 16].try_into().expect("16 bytes"));
        let bytes = _mm_set_epi64x((block >> 64) as i64, block as i64);
        // Bits for the bytes before `at` (seen in the previous block) are dropped.
        let fresh = u32::MAX << (at - start);
        let is = |byte: u8, within| {
            _mm_movemask_epi8(_mm_cmpeq_epi8(within, _mm_set1_epi8(byte as i8))) as u32 & fresh
        };
        if out.semicolon.is_none() {
            let semicolons = is(b';', bytes);
            if semicolons != 0 {
                out.semicolon = Some(start + semicolons.trailing_zeros() as usize);
            }
        }
        if !out.write_word {
            // `| 0x20` maps exactly O and o to o, V and v to v.
            let lowered = _mm_or_si128(bytes, _mm_set1_epi8(0x20));
            let mut letters = is(b'o', lowered) | is(b'v', lowered);
            while letters != 0 {
                if write_word_at(text, start + letters.trailing_zeros() as usize) {
                    out.write_word = true;
                    break;
                }
                letters &= letters - 1;
            }
        }
        if out.semicolon.is_some() && out.write_word {
            break;
        }
        at = start + 16;
    }
    out
}

/// Scans `text` eight bytes at a time, until it has found both a semicolon and a write word
/// or reached the end.
fn scan_words(text: &[u8]) -> Scan {
    let mut out = Scan {
        semicolon: None,
        write_word: false,
    };
    let mut chunks = text.chunks_exact(8);
    for (n, chunk) in (&mut chunks).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if look(text, word, 8 * n, &mut out) {
            return out;
        }
    }
    // The last few bytes, padded with zeros (spaces, once `| 0x20`; never a semicolon).
    let rest = chunks.remainder();
    let mut last = [0; 8];
    last[..rest.len()].copy_from_slice(rest);
    look(
        text,
        u64::from_le_bytes(last),
        text.len() - rest.len(),
        &mut out,
    );
    out
}

/// [`scan_words`]'s look at the eight bytes `word` from `at` of `text`; true once both are
/// found.
///
/// `found` sets the top bit of each byte equal to `byte`; a borrow can also set it in a byte
/// above a true one, but never in the lowest flagged byte, which is exact. For the letters
/// (`| 0x20` maps exactly O and o to o, V and v to v) a false flag costs only a needless look,
/// as [`write_word_at`] checks the byte itself; for the semicolon only the lowest flag is
/// taken, in the bytes as they are (`| 0x20` would make ESC one).
#[inline(always)]
fn look(text: &[u8], word: u64, at: usize, out: &mut Scan) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let found = |word: u64, byte: u8| {
        let x = word ^ (ONES * u64::from(byte));
        x.wrapping_sub(ONES) & !x & (ONES << 7)
    };
    if out.semicolon.is_none() {
        let semicolons = found(word, b';');
        if semicolons != 0 {
            out.semicolon = Some(at + semicolons.trailing_zeros() as usize / 8);
        }
    }
    if !out.write_word {
        let lowered = word | (ONES * 0x20);
        let mut bytes = found(lowered, b'o') | found(lowered, b'v');
        while bytes != 0 {
            if write_word_at(text, at + bytes.trailing_zeros() as usize / 8) {
                out.write_word = true;
                break;
            }
            bytes &= bytes - 1;
        }
    }
    out.semicolon.is_some() && out.write_word
}

/// EXPLAIN reads, but EXPLAIN ANALYZE runs the statement, so it is what the statement is.
fn explain(text: &[u8]) -> Kind {
    if !Tokens::new(text).any(|t| t.is("ANALYZE") || t.is("ANALYSE")) {
        return Kind::Read;
    }
    const INNER: [&str; 11] = [
        "SELECT", "VALUES", "TABLE", "WITH", "INSERT", "UPDATE", "DELETE", "MERGE", "CREATE",
        "EXECUTE", "DECLARE",
    ];
    let mut tokens = Tokens::new(text);
    while let Some(t) = tokens.next() {
        if INNER.iter().any(|k| t.is(k)) {
            let Token::Word(w) = t else { unreachable!() };
            return classify_statement(&text[tokens.at - w.len()..], None);
        }
    }
    Kind::Write
}

/// COPY ... FROM writes; COPY ... TO reads. Only the outer level counts: a query in
/// parentheses has FROM clauses of its own.
fn copy(text: &[u8]) -> Kind {
    let mut depth = 0i32;
    for t in Tokens::new(text) {
        match t {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            _ if depth == 0 && t.is("FROM") => return Kind::Write,
            _ if depth == 0 && t.is("TO") => return Kind::Read,
            _ => {}
        }
    }
    Kind::Write
}

/// The bytes that continue an identifier or keyword, looked up instead of tested one by one.
static WORD_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        c += 1;
    }
    table
};

#[derive(Clone)]
struct Tokens<'a> {
    sql: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.next_token()
    }
}

impl<'a> Tokens<'a> {
    fn new(sql: &'a [u8]) -> Self {
        Tokens { sql, at: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.sql.get(self.at + ahead).copied()
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let c = self.peek(0)?;
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.at += 1,
                b'-' if self.peek(1) == Some(b'-') => {
                    while self.peek(0).is_some_and(|c| c != b'\n') {
                        self.at += 1;
                    }
                }
                b'/' if self.peek(1) == Some(b'*') => self.block_comment(),
                b'(' => return self.one(Token::Open),
                b')' => return self.one(Token::Close),
                b';' => return self.one(Token::Semicolon),
                b'\'' => {
                    self.quoted(b'\'', false);
                    return Some(Token::Other);
                }
                b'"' => {
                    self.quoted(b'"', false);
                    return Some(Token::Other);
                }
                b'$' => {
                    self.dollar();
                    return Some(Token::Other);
                }
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    // E'...' is a string with backslash escapes.
                    if (c == b'e' || c == b'E') && self.peek(1) == Some(b'\'') {
                        self.at += 1;
                        self.quoted(b'\'', true);
                        return Some(Token::Other);
                    }
                    let start = self.at;
                    self.at += self.word_len();
                    return Some(Token::Word(&self.sql[start..self.at]));
                }
                // A run of digits is one token. What follows it is a token of its own, as
                // servers before 15 read `1into` as `1 into`.
                b'0'..=b'9' => {
                    let rest = &self.sql[self.at..];
                    self.at += rest
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .unwrap_or(rest.len());
                    return Some(Token::Other);
                }
                _ => return self.one(Token::Other),
            }
        }
    }

    /// How many bytes from here continue a word: letters, digits, `_`, `$` and non-ASCII.
    fn word_len(&self) -> usize {
        let rest = &self.sql[self.at..];
        rest.iter()
            .position(|&c| !WORD_BYTE[usize::from(c)])
            .unwrap_or(rest.len())
    }

    fn one(&mut self, t: Token<'a>) -> Option<Token<'a>> {
        self.at += 1;
        Some(t)
    }

    /// `/* ... */`, which nests in PostgreSQL.
    fn block_comment(&mut self) {
        let mut depth = 0;
        while let Some(c) = self.peek(0) {
            if c == b'/' && self.peek(1) == Some(b'*') {
                depth += 1;
                self.at += 2;
            } else if c == b'*' && self.peek(1) == Some(b'/') {
                depth -= 1;
                self.at += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.at += 1;
            }
        }
    }

    /// A quoted string or identifier; a doubled quote is an escaped quote.
    fn quoted(&mut self, quote: u8, backslash_escapes: bool) {
        self.at += 1;
        while let Some(c) = self.peek(0) {
            self.at += 1;
            if backslash_escapes && c == b'\\' {
                self.at += 1;
            } else if c == quote {
                if self.peek(0) == Some(quote) {
                    self.at += 1;
                } else {
                    return;
                }
            }
        }
    }

    /// `$tag$ ... $tag$`, or a parameter such as `$1`.
    fn dollar(&mut self) {
        let rest = &self.sql[self.at + 1..];
        let tag_len = rest
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
            .count();
        let is_tag =
            rest.get(tag_len) == Some(&b'$') && !rest.first().is_some_and(|c| c.is_ascii_digit());
        if !is_tag {
            self.at += 1 + tag_len;
            return;
        }
        let delimiter = &self.sql[self.at..self.at + tag_len + 2];
        let body_start = self.at + delimiter.len();
        match self.sql[body_start..]
            .windows(delimiter.len())
            .position(|w| w == delimiter)
        {
            Some(end) => self.at = body_start + end + delimiter.len(),
            None => self.at = self.sql.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// A fixed pseudo-random sequence (xorshift) for the tests' generated texts.
    struct Random(u64);

    impl Random {
        /// The next number below `n`.
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        /// `len` bytes drawn from `alphabet`.
        fn text(&mut self, alphabet: &[u8], len: usize) -> Vec<u8> {
            (0..len)
                .map(|_| alphabet[self.below(alphabet.len())])
                .collect()
        }
    }

    #[test]
    fn features_that_outlive_a_transaction_are_named() {
        let pins = |sql: &str| session_feature(sql.as_bytes());
        for sql in [
            "LISTEN jobs",
            "select 1; listen jobs",
            "PREPARE p AS SELECT 1",
            "LOAD 'auto_explain'",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "create global temporary table t (x int)",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_catalog.pg_try_advisory_lock_shared(1, 2)",
            "SELECT set_config('work_mem', '1MB', false)",
            "SET work_mem = '1MB'",
            "SET SESSION search_path TO a",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "RESET ALL",
            "RESET work_mem",
            "DISCARD ALL",
            "DEALLOCATE ALL",
        ] {
            assert!(pins(sql).is_some(), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET application_name = 'x'",
            "SET SESSION TimeZone TO 'UTC'",
            "SET TIME ZONE 'UTC'",
            "SET NAMES 'UTF8'",
            "RESET application_name",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT 'LISTEN x', \"pg_advisory_lock\"",
            "PREPARE TRANSACTION 'x'",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE TABLE t (x int)",
            "INSERT INTO t VALUES (1) /* SET work_mem */",
        ] {
            assert_eq!(pins(sql), None, "{sql}");
        }
    }
    use super::Kind::{Commit, Read, Write};
    use super::*;

    #[track_caller]
    fn check(sql: &str, want: Kind) {
        assert_eq!(classify(sql.as_bytes(), true), want, "{sql}");
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT 1",
            "select * from t where a = 1",
            "SELECT 1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;\n ",
            "SELECT ';'",
            "SELECT 'a;b' FROM t;",
            "SELECT 1; SELECT 2",
            "  \n\tSELECT 1",
            "(SELECT 1) UNION (SELECT 2)",
            "((select 1))",
            "VALUES (1), (2)",
            "TABLE accounts",
            "SHOW work_mem",
            "SET search_path = app",
            "RESET ALL",
            "BEGIN",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "START TRANSACTION READ ONLY",
            "ROLLBACK",
            "ABORT",
            "ROLLBACK TO SAVEPOINT a",
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "FETCH 10 FROM c",
            "MOVE NEXT IN c",
            "CLOSE c",
            "LISTEN events",
            "UNLISTEN *",
            "DISCARD ALL",
            "DEALLOCATE s1",
            "PREPARE q AS SELECT 1",
            "EXPLAIN SELECT 1",
            "EXPLAIN DELETE FROM t",
            "EXPLAIN (COSTS OFF) UPDATE t SET a = 1",
            "EXPLAIN ANALYZE SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
            "COPY t TO STDOUT",
            "COPY (SELECT * FROM a WHERE b IN (SELECT c FROM d)) TO STDOUT WITH (FORMAT csv)",
            "copy t (a, b) to stdout",
            "DECLARE c CURSOR FOR SELECT * FROM t",
            "SELECT substring('abc' FOR 2)",
            "SELECT 'INSERT INTO t VALUES (1)'",
            "SELECT $$DELETE FROM t$$",
            "SELECT $body$ UPDATE t SET a = 1 $body$",
            "SELECT \"update\" FROM t",
            "SELECT E'it\\'s; DELETE FROM t'",
            "SELECT 'it''s; DELETE FROM t'",
            "-- DELETE FROM t\nSELECT 1",
            "/* DELETE FROM t */ SELECT 1",
            "/* nested /* DELETE */ still comment */ SELECT 1",
            "SELECT 1; SELECT 2",
            "SELECT $1::int",
            "SELECT a$b FROM t",
            "",
            "   ",
            ";",
            "-- only a comment",
            "SELECT pg_sleep(1)",
            "SELECT * FROM t FOR ORDINALITY",
            "SELECT 'for update' FROM t",
            "SELECT forecast, interval '1 day', valid, point FROM t",
        ] {
            check(sql, Read);
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "insert into t select * from s",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "TRUNCATE t",
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD COLUMN b int",
            "DROP TABLE t",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "GRANT SELECT ON t TO u",
            "COMMENT ON TABLE t IS 'x'",
            "VACUUM t",
            "ANALYZE t",
            "CLUSTER t",
            "REINDEX TABLE t",
            "REFRESH MATERIALIZED VIEW v",
            "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
            "NOTIFY events, 'x'",
            "CALL proc(1)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "EXECUTE q(1)",
            "CHECKPOINT",
            "COPY t FROM STDIN",
            "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
            "copy t from '/tmp/x'",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t WHERE id = 1 FOR SHARE",
            "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
            "SELECT * FROM t FOR KEY SHARE",
            "select * from t for update nowait",
            "(SELECT * FROM t FOR UPDATE)",
            "SELECT * INTO new_t FROM t",
            "SELECT 1into new_t",
            "SELECT 12345 FOR UPDATE",
            "SELECT 1e5 FROM t FOR SHARE",
            "SELECT nextval('s')",
            "SELECT setval('s', 10)",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT count(*) FROM u",
            "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
            "EXPLAIN ANALYZE DELETE FROM t",
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
            "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT 1",
            "SELECT 1; DELETE FROM t",
            "SELECT 1;DELETE FROM t;",
            "SELECT 'x;'; UPDATE t SET a = 1;\n",
            "UPDATE t SET a = 1;",
            "SELECT * FROM t FOR UPDATE;  ",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT",
            "/* SELECT */ INSERT INTO t VALUES (1)",
            "-- SELECT\nUPDATE t SET a = 1",
            "SELECT 'x'; UPDATE t SET a = 1 -- trailing",
            "COMMIT PREPARED 'tx1'",
            "ROLLBACK PREPARED 'tx1'",
            "SECURITY LABEL ON TABLE t IS 'x'",
            "IMPORT FOREIGN SCHEMA s FROM SERVER f INTO l",
            "FROBNICATE everything",
            "42",
            "'a string first'",
            "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
            "SeLeCt NeXtVaL('s')",
            "select * from t fOr UpDaTe",
            "SELECT *\nINTO\tx FROM t",
        ] {
            check(sql, Write);
        }
    }

    fn scan_finds_a_write_word(text: &[u8]) -> bool {
        scan(text).write_word
    }

    #[test]
    fn the_byte_scan_clears_plain_reads_and_passes_every_word_that_can_make_a_write() {
        assert!(!scan_finds_a_write_word(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 7;"
        ));
        assert!(!scan_finds_a_write_word(b"SELECT 1 FROM orders o"));
        for w in [
            "for", "FOR", "fOr", "into", "INTO", "iNtO", "nextval", "SETVAL", "NeXtVaL",
        ] {
            assert!(scan_finds_a_write_word(w.as_bytes()), "{w}");
            assert!(
                scan_finds_a_write_word(format!("SELECT 1 {w}(x)").as_bytes()),
                "{w}"
            );
        }
    }

    #[test]
    fn the_byte_scan_finds_each_word_at_every_offset_and_across_eight_byte_boundaries() {
        for w in ["for", "INTO", "nextval", "SetVal"] {
            for pad in 0..20 {
                for tail in 0..10 {
                    let text = format!("{}{w}{}", "x".repeat(pad), "y".repeat(tail));
                    assert!(scan_finds_a_write_word(text.as_bytes()), "{text}");
                }
            }
        }
        // Bytes one bit away from O and V (0x0f, 0x16: bit 6) and a slash where the O of FOR
        // would be are no hit.
        for pad in 0..20 {
            let text = format!("{}F\x0fR INT\x0f N\x16AL f/r", "x".repeat(pad));
            assert!(!scan_finds_a_write_word(text.as_bytes()), "{text:?}");
        }
    }

    #[test]
    fn the_byte_scan_finds_the_first_semicolon_at_every_offset() {
        // Bytes next to a semicolon's value (':' and '<', and ESC, which `| 0x20` would turn
        // into one) around it, and a second semicolon after it.
        for pad in 0..20 {
            for before in ["", ":", "<", "\x1b", "x:<"] {
                let text = format!("{}{before};\x1b:;<{}", "x".repeat(pad), "y".repeat(pad % 7));
                let want = text.bytes().position(|b| b == b';');
                assert_eq!(scan(text.as_bytes()).semicolon, want, "{text:?}");
            }
            let none = format!("{}:\x1b<", "x".repeat(pad));
            assert_eq!(scan(none.as_bytes()).semicolon, None, "{none:?}");
        }
    }

    #[test]
    fn the_vector_scan_finds_what_the_word_scan_finds() {
        // Texts of every length to 70 from letters of the write words, their neighbours in
        // the byte table, semicolons and ESC, from a fixed pseudo-random sequence.
        let alphabet = b"fFoOrRiInNtTvVaAlL;:<\x1b\x0f\x16 x_";
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        for len in 0..70 {
            for _ in 0..200 {
                let text = random.text(alphabet, len);
                let slow = Scan {
                    semicolon: text.iter().position(|&b| b == b';'),
                    write_word: (0..text.len()).any(|i| write_word_at(&text, i)),
                };
                assert_eq!(scan(&text), slow, "{text:?}");
                assert_eq!(scan_words(&text), slow, "{text:?}");
            }
        }
    }

    #[test]
    fn transaction_ends() {
        for sql in [
            "COMMIT",
            "commit work",
            "END",
            "END TRANSACTION",
            "PREPARE TRANSACTION 'tx1'",
            "SELECT 1; COMMIT",
        ] {
            check(sql, Commit);
        }
        check("INSERT INTO t VALUES (1); COMMIT", Write);
    }

    #[test]
    fn transaction_control_statements() {
        let cases = [
            ("ROLLBACK", Some(Control::Rollback)),
            ("rollback work;", Some(Control::Rollback)),
            ("ABORT", Some(Control::Rollback)),
            ("ROLLBACK TO SAVEPOINT a", Some(Control::RollbackTo)),
            ("rollback to a", Some(Control::RollbackTo)),
            ("COMMIT", Some(Control::Commit)),
            ("END TRANSACTION", Some(Control::Commit)),
            ("/* c */ commit", Some(Control::Commit)),
            ("COMMIT PREPARED 'x'", None),
            ("ROLLBACK PREPARED 'x'", None),
            ("SELECT 1", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(transaction_control(sql.as_bytes()), want, "{sql}");
        }
    }

    #[test]
    fn unterminated_constructs_do_not_hide_later_text_forever() {
        // An unterminated string swallows the rest, as the server would reject it anyway.
        check("SELECT 'unterminated; DELETE FROM t", Read);
        check("SELECT $$ unterminated", Read);
        check("SELECT 1 /* unterminated comment", Read);
    }

    #[test]
    fn text_seen_only_in_part_is_a_write_unless_it_already_writes() {
        assert_eq!(classify(b"SELECT 1, 2, 3", false), Write);
        assert_eq!(classify(b"INSERT INTO t VALUES ('x", false), Write);
        assert_eq!(classify(b"COMMIT", false), Commit);
    }

    #[test]
    fn the_memo_answers_as_classify_does_for_repeated_and_changing_texts() {
        let mut memo = Memo::default();
        let long = format!("SELECT 1 /* {} */", "x".repeat(MEMO_LIMIT));
        for (sql, complete) in [
            ("SELECT 1", true),
            ("SELECT 1", true),
            ("SELECT 1", false),
            ("SELECT 1", false),
            ("DELETE FROM t", true),
            ("DELETE FROM t", true),
            ("SELECT 1", true),
            (long.as_str(), true),
            (long.as_str(), true),
            ("", true),
            ("COMMIT", true),
        ] {
            assert_eq!(
                memo.classify(sql.as_bytes(), complete),
                classify(sql.as_bytes(), complete),
                "{sql:.20} {complete}"
            );
        }
        assert!(memo.text().len() <= MEMO_LIMIT);
        memo.release();
        assert_eq!(memo.text.capacity(), 0);
        assert_eq!(memo.classify(b"UPDATE t SET a = 1", true), Write);
    }

    #[test]
    fn the_end_of_a_run_of_digits_is_found_for_every_byte_after_it() {
        for len in 0..20 {
            for stop in 0..=255u8 {
                let mut text = vec![b'x'; 3];
                text.extend(std::iter::repeat_n(b'7', len));
                text.push(stop);
                text.extend_from_slice(b"12345678");
                let end = if stop.is_ascii_digit() {
                    len + 1 + 8 + 3
                } else {
                    len + 3
                };
                assert_eq!(digits_end(&text, 3), end, "{len} digits, then {stop:#x}");
            }
        }
        assert_eq!(digits_end(b"", 0), 0);
        assert_eq!(digits_end(b"abcdefgh123", 8), 11);
        assert_eq!(digits_end(b"abcdefgh12;", 8), 10);
        assert_eq!(digits_end(b"abcdefg1234", 7), 11);
        assert_eq!(digits_end(b"abcdefg1234", 6), 6);
        assert_eq!(digits_end(b"123", 3), 3);
    }

    /// Whether `b` matches `a` remembered, with its numbers found as the memo finds them.
    fn remembered_matches(a: &str, b: &str) -> bool {
        let mut runs = Vec::new();
        number_runs(a.as_bytes(), &mut runs);
        same_but_numbers(a.as_bytes(), &runs, b.as_bytes())
    }

    #[test]
    fn numbers_are_found_where_they_start_a_token_and_nowhere_else() {
        let runs = |t: &[u8]| {
            let mut out = Vec::new();
            number_runs(t, &mut out);
            out.chunks_exact(4)
                .map(|r| {
                    (
                        u16::from_le_bytes([r[0], r[1]]),
                        u16::from_le_bytes([r[2], r[3]]),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(b"12 a1 $3 x.45e67 -8"), [(0, 2), (11, 13), (18, 19)]);
        assert_eq!(
            runs(b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
            [(50, 55)]
        );
        assert_eq!(runs("t2 é3 _4".as_bytes()), []);
        // Against the rule read byte by byte, for texts of every length up to 40 and of
        // digits, letters and separators in all places (some runs crossing eight-byte words).
        let by_byte = |t: &[u8]| {
            let mut out = Vec::new();
            for i in 0..t.len() {
                let starts = t[i].is_ascii_digit() && (i == 0 || !t[i - 1].is_ascii_digit());
                if starts && (i == 0 || !WORD_BYTE[usize::from(t[i - 1])]) {
                    let end = (i..t.len())
                        .find(|&j| !t[j].is_ascii_digit())
                        .unwrap_or(t.len());
                    out.push((i as u16, end as u16));
                }
            }
            out
        };
        let alphabet = b"1234567890a_ .$;\xc3";
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        for n in 0..=40 {
            for _ in 0..200 {
                let t = random.text(alphabet, n);
                assert_eq!(runs(&t), by_byte(&t), "{t:?}");
            }
        }
    }

    #[test]
    fn same_compares_every_byte_of_every_length() {
        for n in 0..40 {
            let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same(&a, &a.clone()), "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same(&a, &b), "{n} bytes, differing at {at}");
            }
            assert!(!same(&a, &a[..n.saturating_sub(1)]) || n == 0, "{n}");
        }
    }

    #[test]
    fn texts_that_differ_only_in_numbers_are_the_same_statement() {
        for (a, b) in [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            ),
            ("SELECT 1", "SELECT 2"),
            ("SELECT 12", "SELECT 123"),
            ("SELECT 123", "SELECT 12"),
            ("1", "22"),
            (
                "SELECT x FROM t LIMIT 10 OFFSET 20",
                "SELECT x FROM t LIMIT 5 OFFSET 300000",
            ),
            ("SELECT 1.5, -3, 2e10", "SELECT 17.25, -40, 2e10"),
            ("SELECT '12' /* 3 */", "SELECT '99' /* 44 */"),
            ("SELECT 1,2,3", "SELECT 4,5,6"),
        ] {
            assert!(remembered_matches(a, b), "{a} / {b}");
        }
        for (a, b) in [
            ("SELECT 1", "SELECT 1 "),
            ("SELECT 1", "DELETE 1"),
            ("SELECT a FROM t1", "SELECT a FROM t2"), // part of an identifier
            ("SELECT $1", "SELECT $2"),               // a parameter
            ("SELECT $a1$ x $a1$", "SELECT $a2$ x $a1$"), // a dollar-quote tag
            ("SELECT 1e5", "SELECT 1e6"),             // after a letter
            ("SELECT é1", "SELECT é2"),               // after a non-ASCII letter
            ("SELECT _1", "SELECT _2"),
            ("SELECT 12 x", "SELECT 12y"),
            ("SELECT 1x", "SELECT 1 x"),
            ("SELECT 1", "SELECT x"),
            ("SELECT", "SELECT 1"),
            ("", "1"),
        ] {
            assert!(!remembered_matches(a, b), "{a} / {b}");
            assert!(!remembered_matches(b, a), "{b} / {a}");
        }
    }

    #[test]
    fn the_memo_answers_as_classify_does_for_random_texts_and_their_renumberings() {
        // Texts made of pieces that move classification (keywords, quotes, comments, dollar
        // tags, semicolons, words with digits in them, numbers), each followed by copies with
        // every digit redrawn and with digits added or dropped: a memo that matched where
        // classification differs fails here.
        const PIECES: [&str; 33] = [
            "SELECT ",
            "DELETE ",
            "UPDATE t SET a = ",
            "INSERT INTO t VALUES (",
            "COMMIT",
            "FOR UPDATE ",
            "nextval(",
            "INTO ",
            "t1 ",
            "$1 ",
            "$a1$",
            "$a2$",
            "'",
            "\"",
            "/* ",
            " */",
            "-- ",
            "\n",
            "; ",
            " ",
            "7",
            "42",
            "1e5",
            "x2",
            "_3",
            ".5",
            "-",
            "E'",
            "WITH ",
            "RETURNING ",
            "; DELETE FROM t; ",
            "$b1$ x ",
            "1into ",
        ];
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| random.below(n);
        let mut memo = Memo::default();
        for _ in 0..20_000 {
            let text: String = (0..1 + next(12))
                .map(|_| PIECES[next(PIECES.len())])
                .collect();
            let mut variants = vec![text.clone()];
            for _ in 0..3 {
                let mut v = String::new();
                for c in text.chars() {
                    if c.is_ascii_digit() {
                        match next(6) {
                            0 => {}                                       // dropped
                            1 => v.push_str(&format!("{c}{}", next(10))), // one more
                            _ => v.push(char::from(b'0' + next(10) as u8)),
                        }
                    } else {
                        v.push(c);
                    }
                }
                variants.push(v);
            }
            for sql in variants {
                let complete = next(4) != 0;
                assert_eq!(
                    memo.classify(sql.as_bytes(), complete),
                    classify(sql.as_bytes(), complete),
                    "{sql:?} after {text:?}"
                );
            }
        }
    }

    #[test]
    fn the_memo_answers_as_classify_does_when_only_numbers_change() {
        // Each text after each other, with its numbers changed: the memo, hit or not, must
        // answer exactly as a classification of the new text.
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 9;",
            "SELECT 1 FOR UPDATE",
            "SELECT * FROM t1 LIMIT 1",
            "SELECT nextval('s1'), 2",
            "SELECT 1; DELETE FROM t WHERE id = 3",
            "SELECT $b1$ 1; DELETE $b1$ , 1",
            "SELECT $b1$ 1 $b2$; DELETE FROM t; $b1$",
            "SELECT $b1$ x $b1$; DELETE FROM t",
            "SELECT t1 FROM t1; DELETE FROM t1",
            "SELECT 1 -- 2; DELETE\n",
            "SELECT 1 /* 2 */; COMMIT",
            "COMMIT",
            "SELECT 1into t",
            "SELECT 10 INTO t2 FROM t",
            "WITH x AS (DELETE FROM t WHERE a = 1 RETURNING 2) SELECT 3",
            "SELECT E'\\'' 1; DELETE FROM t; '",
        ];
        // `t` with its `which`-th run of digits (counted from 0) replaced by another number.
        let renumbered = |t: &str, which: usize| {
            let mut out = String::new();
            let mut runs = 0;
            let mut digits = false;
            for c in t.chars() {
                let starts = c.is_ascii_digit() && !digits;
                digits = c.is_ascii_digit();
                if starts {
                    runs += 1;
                    if runs - 1 == which {
                        out.push_str("4096");
                    }
                }
                if !digits || runs - 1 != which {
                    out.push(c);
                }
            }
            out
        };
        let mut memo = Memo::default();
        for first in texts {
            for second in texts {
                for which in 0..4 {
                    let next = renumbered(second, which);
                    for (sql, complete) in [(first.to_string(), true), (next, which != 1)] {
                        assert_eq!(
                            memo.classify(sql.as_bytes(), complete),
                            classify(sql.as_bytes(), complete),
                            "{sql} after {first}"
                        );
                    }
                }
            }
        }
        // A hit keeps the text first classified.
        memo.classify(b"SELECT 1 FROM t WHERE a = 5", true);
        assert_eq!(memo.classify(b"SELECT 1 FROM t WHERE a = 600", true), Read);
        assert_eq!(memo.text(), b"SELECT 1 FROM t WHERE a = 5");
        memo.release();
        assert_eq!(memo.text.capacity(), 0);
        assert_eq!(memo.classify(b"UPDATE t SET a = 1", true), Write);
    }
}
