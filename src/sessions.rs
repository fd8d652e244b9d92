//! What each client session is doing right now, for `GET /sessions` and `bulkhead status`.
//!
//! Every session owns a [`View`]: plain atomics it stores into once per wake-up of its relay
//! (a few relaxed stores to memory only it writes), and, only with `[health] show_statements`,
//! a buffer for its last statement's text behind a lock of its own that nobody but the health
//! thread ever contends for. The [`Registry`] of views is sharded; a session takes its shard's
//! lock when it begins and when it ends, never on the relay path, and the health thread takes
//! each shard's lock only to copy the pointers out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use crate::metrics::Class;
use crate::protocol::backend::TxStatus;

/// Statement text kept per session (bytes, cut at a character boundary).
pub const STATEMENT_BYTES: usize = 256;

const SHARDS: usize = 16;

/// `host` when the session holds no server connection (transaction pooling between
/// transactions, or before one is lent).
const NO_HOST: usize = usize::MAX;

/// Who the client said it is, from its startup packet: user, database and application_name,
/// in one allocation (NUL cannot occur in them).
#[derive(Debug)]
pub struct Identity(Box<str>);

impl Identity {
    pub fn new(user: &str, database: &str, application_name: &str) -> Self {
        Identity(format!("{user}\0{database}\0{application_name}").into_boxed_str())
    }

    fn part(&self, i: usize) -> &str {
        self.0.split('\0').nth(i).unwrap_or("")
    }
}

/// One session, as the health thread sees it.
#[derive(Debug)]
pub struct View {
    id: u64,
    peer: Option<SocketAddr>,
    readonly: bool,
    /// When the session began, in µs since [`epoch`].
    connected: u64,
    identity: OnceLock<Identity>,
    /// Index into [database] hosts, or `NO_HOST`.
    host: AtomicUsize,
    /// `TxStatus` as its byte ('I', 'T', 'E'); 0 during startup.
    tx: AtomicU8,
    /// 0: nothing in flight; 1 + the class of the request the server is working on.
    head: AtomicU8,
    /// When that request's clock started, in µs since [`epoch`].
    head_since: AtomicU64,
    /// 0: not waiting for a slot; 1: for an "all" slot; 2: for a write slot.
    waiting: AtomicU8,
    waiting_since: AtomicU64,
    /// The last statement text the client sent, with `[health] show_statements`.
    statement: Option<Box<Mutex<String>>>,
}

/// The moment the views' times count from, on both clocks: a view keeps its times as
/// microseconds since then, so that it carries no clock of its own.
fn epoch() -> (Instant, SystemTime, crate::clock::Instant) {
    static EPOCH: OnceLock<(Instant, SystemTime, crate::clock::Instant)> = OnceLock::new();
    // Both monotonic readings are of the same clock, read one after the other.
    *EPOCH.get_or_init(|| {
        (
            Instant::now(),
            SystemTime::now(),
            crate::clock::Instant::now(),
        )
    })
}

fn micros(at: Instant) -> u64 {
    let since = at.saturating_duration_since(epoch().0);
    since.as_secs() * 1_000_000 + u64::from(since.subsec_micros())
}

fn at_micros(micros: u64) -> Instant {
    epoch().0 + Duration::from_micros(micros)
}

impl View {
    pub fn set_identity(&self, identity: Identity) {
        let _ = self.identity.set(identity);
    }

    /// What the relay publishes once per wake-up: the host it holds, the transaction status
    /// its client was last told, and the class of the request the server is working on.
    /// `head_since` is when that request's clock started, given only when it moved: turning a
    /// time into microseconds on every wake-up cost 2% of the relay's instructions.
    pub fn publish(
        &self,
        host: Option<usize>,
        tx: Option<TxStatus>,
        head: Option<Class>,
        head_since: Option<crate::clock::Instant>,
    ) {
        self.host.store(host.unwrap_or(NO_HOST), Ordering::Relaxed);
        self.tx.store(tx.map_or(0, tx_byte), Ordering::Relaxed);
        if let Some(since) = head_since {
            self.head_since
                .store(since.micros_since(epoch().2), Ordering::Relaxed);
        }
        self.head
            .store(head.map_or(0, |class| 1 + class as u8), Ordering::Relaxed);
    }

    /// The session waits for a concurrency slot (a write slot if `write`) from now.
    pub fn waiting(&self, write: bool) {
        self.waiting_since
            .store(micros(Instant::now()), Ordering::Relaxed);
        self.waiting.store(1 + write as u8, Ordering::Relaxed);
    }

    pub fn not_waiting(&self) {
        self.waiting.store(0, Ordering::Relaxed);
    }

    /// Keeps the text of a statement the client sent, if statements are shown. Cut to
    /// `STATEMENT_BYTES` at a character boundary; never allocates once the buffer exists.
    pub fn statement(&self, text: &[u8]) {
        let Some(buffer) = &self.statement else {
            return;
        };
        let text = &text[..text.len().min(STATEMENT_BYTES)];
        let text = match std::str::from_utf8(text) {
            Ok(t) => t,
            // Cut inside a character, or not UTF-8 at all: the valid part.
            Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or(""),
        };
        let mut buffer = buffer.lock().unwrap_or_else(|e| e.into_inner());
        buffer.clear();
        buffer.push_str(text);
    }

    pub fn shows_statements(&self) -> bool {
        self.statement.is_some()
    }

    fn age(micros: u64, now: Instant) -> Duration {
        now.saturating_duration_since(at_micros(micros))
    }

    /// The JSON entry for this session; `hosts` are [database] hosts.
    fn describe(&self, hosts: &[String], now: Instant) -> Value {
        let identity = self.identity.get();
        let tx = self.tx.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Relaxed);
        let waiting = self.waiting.load(Ordering::Relaxed);
        let host = self.host.load(Ordering::Relaxed);
        let in_flight = (head != 0).then(|| {
            let class = if head == 1 + Class::Write as u8 {
                "write"
            } else {
                "read"
            };
            let age = Self::age(self.head_since.load(Ordering::Relaxed), now);
            json!({"class": class, "seconds": round_ms(age)})
        });
        let waits = (waiting != 0).then(|| {
            let age = Self::age(self.waiting_since.load(Ordering::Relaxed), now);
            json!({"slot": if waiting == 2 { "write" } else { "all" }, "seconds": round_ms(age)})
        });
        let state = if tx == 0 {
            "startup"
        } else if waits.is_some() {
            "waiting for a slot"
        } else if in_flight.is_some() {
            "active"
        } else {
            match tx {
                b'T' => "idle in transaction",
                b'E' => "idle in transaction (aborted)",
                _ => "idle",
            }
        };
        let mut entry = json!({
            "id": self.id,
            "client": self.peer.map(|p| p.to_string()),
            "listener": if self.readonly { "readonly" } else { "primary" },
            "user": identity.map(|i| i.part(0)),
            "database": identity.map(|i| i.part(1)),
            "application_name": identity.map(|i| i.part(2)),
            "connected_at": rfc3339(epoch().1 + Duration::from_micros(self.connected)),
            "connected_seconds": round_ms(Self::age(self.connected, now)),
            "host": hosts.get(host),
            "state": state,
            "transaction": match tx {
                b'T' => Some("in transaction"),
                b'E' => Some("failed"),
                b'I' => Some("idle"),
                _ => None,
            },
            "statement": in_flight,
            "waiting": waits,
        });
        if let Some(buffer) = &self.statement {
            let text = buffer.lock().unwrap_or_else(|e| e.into_inner()).clone();
            entry["last_statement"] = Value::String(text);
        }
        entry
    }
}

fn tx_byte(tx: TxStatus) -> u8 {
    match tx {
        TxStatus::Idle => b'I',
        TxStatus::InBlock => b'T',
        TxStatus::Failed => b'E',
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

/// A UTC timestamp like 2026-12-05T15:10:22Z.
pub fn rfc3339(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Every live session's view.
#[derive(Debug)]
pub struct Registry {
    shards: [Mutex<HashMap<u64, Arc<View>>>; SHARDS],
    /// [health] sessions: whether sessions register at all.
    enabled: bool,
    /// [health] show_statements.
    show_statements: bool,
}

impl Registry {
    pub fn new(enabled: bool, show_statements: bool) -> Self {
        epoch();
        Registry {
            shards: Default::default(),
            enabled,
            show_statements,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Adds session `id`, if /sessions is on; it is removed when the returned guard is
    /// dropped.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        peer: Option<SocketAddr>,
        readonly: bool,
    ) -> Option<Registered> {
        self.enabled
            .then(|| self.add(id, peer, readonly, self.show_statements))
    }

    fn add(
        self: &Arc<Self>,
        id: u64,
        peer: Option<SocketAddr>,
        readonly: bool,
        show_statements: bool,
    ) -> Registered {
        let view = Arc::new(View {
            id,
            peer,
            readonly,
            connected: micros(Instant::now()),
            identity: OnceLock::new(),
            host: AtomicUsize::new(NO_HOST),
            tx: AtomicU8::new(0),
            head: AtomicU8::new(0),
            head_since: AtomicU64::new(0),
            waiting: AtomicU8::new(0),
            waiting_since: AtomicU64::new(0),
            statement: show_statements
                .then(|| Box::new(Mutex::new(String::with_capacity(STATEMENT_BYTES)))),
        });
        self.shard(id).insert(id, view.clone());
        Registered {
            registry: self.clone(),
            view,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<View>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        (0..SHARDS as u64).map(|i| self.shard(i).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every session, the longest-running statement (or wait) first, then the oldest session.
    pub fn report(&self, hosts: &[String]) -> Value {
        self.report_at(hosts, Instant::now())
    }

    fn report_at(&self, hosts: &[String], now: Instant) -> Value {
        let mut views = Vec::with_capacity(self.len() + 8);
        for i in 0..SHARDS as u64 {
            views.extend(self.shard(i).values().cloned());
        }
        let mut entries: Vec<Value> = views.iter().map(|v| v.describe(hosts, now)).collect();
        let busy = |e: &Value| {
            let seconds = |k: &str| e[k]["seconds"].as_f64().unwrap_or(-1.0);
            seconds("statement").max(seconds("waiting"))
        };
        entries.sort_by(|a, b| {
            busy(b).total_cmp(&busy(a)).then(
                b["connected_seconds"]
                    .as_f64()
                    .unwrap_or(0.0)
                    .total_cmp(&a["connected_seconds"].as_f64().unwrap_or(0.0)),
            )
        });
        json!({
            "count": entries.len(),
            "show_statements": self.show_statements,
            "sessions": entries,
        })
    }
}

/// A session's place in the registry, for its life.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    pub view: Arc<View>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.shard(self.view.id).remove(&self.view.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_cut_at_a_character_boundary_and_shown_only_when_asked() {
        let registry = Arc::new(Registry::new(true, true));
        let shown = registry.add(1, None, false, true);
        let hidden = registry.add(2, None, false, false);
        let long = "é".repeat(STATEMENT_BYTES); // 2 bytes each: the cut falls inside one
        shown.view.statement(long.as_bytes());
        hidden.view.statement(b"SELECT secret");
        shown.view.statement(b"\xff\xfeSELECT 1"); // not UTF-8: nothing valid before the bad byte
        let report = registry.report(&[]);
        let entries = report["sessions"].as_array().unwrap();
        let by_id = |id: u64| entries.iter().find(|e| e["id"] == id).unwrap();
        assert_eq!(by_id(1)["last_statement"], "");
        assert!(by_id(2).get("last_statement").is_none());
        shown.view.statement(long.as_bytes());
        let report = registry.report(&[]);
        let text = report["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == 1)
            .unwrap()["last_statement"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(text, "é".repeat(STATEMENT_BYTES / 2));
    }

    #[test]
    fn a_session_leaves_the_registry_when_it_ends_and_the_busiest_comes_first() {
        let registry = Arc::new(Registry::new(true, false));
        let idle = registry.register(7, None, false).unwrap();
        idle.view.publish(Some(0), Some(TxStatus::Idle), None, None);
        let busy = registry.register(8, None, true).unwrap();
        let started = crate::clock::Instant::now();
        busy.view.publish(
            Some(0),
            Some(TxStatus::InBlock),
            Some(Class::Write),
            Some(started),
        );
        let hosts = vec!["db:5432".to_string()];
        let at = started.into_tokio().into_std() + Duration::from_secs(3);
        let report = registry.report_at(&hosts, at);
        assert_eq!(report["count"], 2);
        let first = &report["sessions"][0];
        assert_eq!(first["id"], 8);
        assert_eq!(first["state"], "active");
        assert_eq!(first["transaction"], "in transaction");
        assert_eq!(first["statement"]["class"], "write");
        assert!(first["statement"]["seconds"].as_f64().unwrap() >= 3.0);
        assert_eq!(first["host"], "db:5432");
        assert_eq!(report["sessions"][1]["state"], "idle");
        drop(busy);
        assert_eq!(registry.len(), 1);
    }

    /// Every idle client carries its view (plus the Arc's two counters): part of the 4 KiB
    /// budget per idle pooled client.
    #[test]
    fn a_view_is_at_most_112_bytes() {
        assert!(
            std::mem::size_of::<View>() <= 112,
            "{}",
            std::mem::size_of::<View>()
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_483_422);
        assert_eq!(rfc3339(at), "2026-12-05T15:10:22Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
