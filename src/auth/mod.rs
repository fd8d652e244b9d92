//! bulkhead authenticating clients itself, for the pooled modes: the secrets (a users file in
//! PgBouncer's format, or an auth query), the exchange with the client (SCRAM-SHA-256, with
//! -PLUS over TLS bound to bulkhead's own certificate, or md5), and what the client's proof
//! leaves for logging in to the server on its behalf.

pub mod client;
pub mod query;
pub mod scram;

use std::collections::HashMap;

use md5::{Digest, Md5};

pub use scram::Verifier;

/// What bulkhead knows of a user's password.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The password itself (and a verifier made from it for SCRAM with clients).
    Plain {
        password: String,
        verifier: Verifier,
    },
    /// `md5` + md5(password + user), as `pg_authid` keeps it.
    Md5(String),
    /// A SCRAM-SHA-256 verifier.
    Scram(Verifier),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Plain { .. } => "Secret::Plain(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
            Secret::Scram(_) => "Secret::Scram(..)",
        })
    }
}

impl Secret {
    /// Reads a secret as PgBouncer's auth_file and `pg_shadow.passwd` write it: a SCRAM
    /// verifier, `md5` and 32 hex digits, or else the password in plain text. `None` for an
    /// empty one (a role without a password cannot log in with one).
    pub fn parse(text: &str) -> Option<Secret> {
        if text.is_empty() {
            return None;
        }
        if let Some(v) = Verifier::parse(text) {
            return Some(Secret::Scram(v));
        }
        if text.len() == 35
            && text.starts_with("md5")
            && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(Secret::Md5(text.to_ascii_lowercase()));
        }
        Some(Secret::Plain {
            password: text.to_string(),
            verifier: Verifier::from_password(text),
        })
    }

    /// Whether `response` (`md5` + hex) answers an md5 challenge with `salt`.
    pub fn md5_matches(&self, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
        let stored = match self {
            Secret::Md5(s) => s.clone(),
            Secret::Plain { password, .. } => {
                postgres_protocol::password::md5(password.as_bytes(), user)
            }
            Secret::Scram(_) => return false,
        };
        let expected = md5_salted(&stored, salt);
        scram::same(expected.as_bytes(), response)
    }
}

/// The answer to an md5 challenge for a stored `md5…` secret: `md5` + md5(hex + salt).
pub fn md5_salted(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored.as_bytes()[3..]);
    h.update(salt);
    let digest = h.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The users file: user name to secret.
#[derive(Debug, Default, Clone)]
pub struct Users(HashMap<String, Secret>);

impl Users {
    /// Parses PgBouncer's auth_file format: one user per line, `"name" "secret"`, a double
    /// quote inside either written twice; anything after the second field is ignored; empty
    /// lines and lines starting with `;` or `#` are comments. The error names the line.
    pub fn parse(text: &str) -> Result<Users, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let (name, rest) = quoted(line).ok_or_else(|| bad("expected \"user\" \"secret\""))?;
            let (secret, _) = quoted(rest.trim_start())
                .ok_or_else(|| bad("expected a quoted secret after the user name"))?;
            if name.is_empty() {
                return Err(bad("empty user name"));
            }
            let secret = Secret::parse(&secret).ok_or_else(|| bad("empty secret"))?;
            users.insert(name, secret);
        }
        Ok(Users(users))
    }

    pub fn load(path: &str) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("auth.file {path}: {e}"))?;
        Users::parse(&text).map_err(|e| format!("auth.file {path}: {e}"))
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.0.get(user)
    }
}

/// A double-quoted string at the start of `s` (`""` for a quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices().peekable();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().is_some_and(|&(_, c)| c == '"') {
                chars.next();
                out.push('"');
            } else {
                return Some((out, &s[i + 2..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// What a client's login left that lets bulkhead log in to the server as that user: the
/// password, the md5 secret, or the client key its SCRAM proof revealed with the verifier.
#[derive(Clone)]
pub enum Credential {
    Password(String),
    Md5(String),
    ScramKeys {
        client_key: [u8; 32],
        verifier: Verifier,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_file_reads_pgbouncers_format() {
        let text = r#"
; a comment
# another
"alice" "plainpw"
"bob" "md5c2b9e32b2d84a03e4b5b0b4b0b4b0b4b" extra
"carol ""c""" "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"#;
        let users = Users::parse(text).unwrap();
        assert!(
            matches!(users.get("alice"), Some(Secret::Plain { password, .. }) if password == "plainpw")
        );
        assert!(matches!(users.get("bob"), Some(Secret::Md5(_))));
        assert!(matches!(users.get("carol \"c\""), Some(Secret::Scram(_))));
        assert!(users.get("dave").is_none());
        let err = Users::parse("\"x\" \"y\"\nnot quoted\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(
            Users::parse("\"x\" \"\"")
                .unwrap_err()
                .contains("empty secret")
        );
    }

    #[test]
    fn md5_answers_are_checked_from_the_password_or_the_md5_secret() {
        let salt = [1, 2, 3, 4];
        let answer = postgres_protocol::authentication::md5_hash(b"u", b"pw", salt);
        let plain = Secret::parse("pw").unwrap();
        let md5 = Secret::parse(&postgres_protocol::password::md5(b"pw", "u")).unwrap();
        assert!(plain.md5_matches("u", salt, answer.as_bytes()));
        assert!(md5.md5_matches("u", salt, answer.as_bytes()));
        assert!(!md5.md5_matches("u", [0; 4], answer.as_bytes()));
        assert!(
            !Secret::parse("other")
                .unwrap()
                .md5_matches("u", salt, answer.as_bytes())
        );
    }
}
