//! The map from the cancel keys bulkhead gives its clients to the server backends that serve
//! them. A client's key is its backend's real process id (so `pg_backend_pid()`,
//! `pg_terminate_backend()` and the pid of a NOTIFY match what the driver was told) with a
//! secret of bulkhead's own. A client never learns a server's secret, so it can cancel only its
//! own session, and a key dies with its session: a late cancel cannot hit whoever uses that
//! backend next. Two hosts may use the same pid, so the pid and secret together are the key.
//!
//! One mutex guards the map, taken when a session starts or ends and for each CancelRequest;
//! never on the relay path. In transaction pooling a client moves from backend to backend:
//! its entry is a [`Slot`] of its own, which the session points at the backend it holds (or
//! at none) under the slot's own lock, shared with nobody but a cancel for that session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Dropped cancel requests are logged at most once per this period, with their count.
const UNKNOWN_LOG_PERIOD: Duration = Duration::from_secs(10);

/// The server backend behind one client session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub pid: i32,
    pub key: bytes::Bytes,
}

/// Where one session's cancel key points now: the backend it holds, or none.
#[derive(Debug, Default)]
pub struct Slot(Mutex<Option<Target>>);

impl Slot {
    pub fn set(&self, target: Option<Target>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

/// A client's key: the pid it was told and bulkhead's secret.
type Key = (i32, [u8; 4]);

#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<HashMap<Key, Arc<Slot>>>,
    /// Cancel requests with unknown keys since the last log line about them.
    unknown: AtomicU64,
    /// When that line was last written.
    unknown_logged: Mutex<Option<Instant>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            sessions: Mutex::default(),
            unknown: AtomicU64::new(0),
            unknown_logged: Mutex::new(None),
        }
    }
}

impl Registry {
    /// Gives a new session its key: its backend's process id and a secret of bulkhead's own,
    /// and records which backend they stand for.
    pub fn register(&self, target: Target) -> (i32, [u8; 4]) {
        let pid = target.pid;
        let (secret, _) = self.register_slot(pid, Some(target));
        (pid, secret)
    }

    /// Gives a new session the key `pid` and a secret, for a slot that points at `target`;
    /// the session moves the slot as it moves between backends.
    pub fn register_slot(&self, pid: i32, target: Option<Target>) -> ([u8; 4], Arc<Slot>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut secret = [0u8; 4];
            getrandom::fill(&mut secret).expect("operating system random source");
            if let std::collections::hash_map::Entry::Vacant(v) = sessions.entry((pid, secret)) {
                let slot = Arc::new(Slot(Mutex::new(target)));
                v.insert(slot.clone());
                return (secret, slot);
            }
        }
    }

    /// Notes a cancel request with an unknown key. Returns how many were dropped since the last
    /// time it returned a number, at most once per 10 s, so that a flood (a client guessing
    /// keys, or one cancelling long-gone sessions) is seen in the log without flooding it.
    pub fn unknown_key(&self) -> Option<u64> {
        self.unknown.fetch_add(1, Ordering::Relaxed);
        let mut logged = self
            .unknown_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if logged.is_some_and(|at| now < at + UNKNOWN_LOG_PERIOD) {
            return None;
        }
        *logged = Some(now);
        Some(self.unknown.swap(0, Ordering::Relaxed))
    }

    /// Forgets a session's key.
    pub fn remove(&self, pid: i32, secret: [u8; 4]) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid, secret));
    }

    /// The backend a client's CancelRequest stands for, if the key is a live session's. (The
    /// map hashes with a random key, so lookup time tells nothing useful about a secret.)
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<Target> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        let slot = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.get(&(pid, secret)).cloned()?
        };
        slot.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pid: i32) -> Target {
        Target {
            addr: ([127, 0, 0, 1], 5432).into(),
            pid,
            key: bytes::Bytes::from_static(&[9, 9, 9, 9]),
        }
    }

    #[test]
    fn key_finds_its_backend_until_removed() {
        let r = Registry::default();
        let (pid, secret) = r.register(target(100));
        assert_eq!(pid, 100, "the client is told its backend's real pid");
        let (pid2, _) = r.register(target(200));
        assert_ne!(pid, pid2);
        assert_eq!(r.lookup(pid, &secret), Some(target(100)));
        r.remove(pid, secret);
        assert_eq!(r.lookup(pid, &secret), None);
    }

    #[test]
    fn the_same_pid_on_two_hosts_keeps_two_keys() {
        let r = Registry::default();
        let mut other = target(100);
        other.addr = ([127, 0, 0, 2], 5432).into();
        let (pid, a) = r.register(target(100));
        let (pid_b, b) = r.register(other.clone());
        assert_eq!((pid, pid_b), (100, 100));
        assert_ne!(a, b);
        assert_eq!(r.lookup(100, &a), Some(target(100)));
        assert_eq!(r.lookup(100, &b), Some(other));
    }

    #[test]
    fn wrong_secret_or_length_finds_nothing() {
        let r = Registry::default();
        let (pid, secret) = r.register(target(100));
        let mut wrong = secret;
        wrong[3] ^= 1;
        assert_eq!(r.lookup(pid, &wrong), None);
        assert_eq!(r.lookup(pid, &secret[..3]), None);
        let mut long = secret.to_vec();
        long.push(0);
        assert_eq!(r.lookup(pid, &long), None);
        assert_eq!(r.lookup(pid + 1, &secret), None);
    }
}
