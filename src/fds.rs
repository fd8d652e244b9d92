//! File descriptors: every session costs two (client and server), and a process that runs out
//! of them can neither accept, nor probe, nor answer its health port. So the soft limit is
//! raised to the hard one at start; sessions are capped so that descriptors are left over
//! for refusing the next client (53300), for the probe and for the health port; and each
//! accepting loop keeps one descriptor in reserve as a last resort: when accept fails for lack
//! of descriptors, the reserve is given up for the one connection waiting, which gets an answer
//! instead of hanging in the backlog.

use std::io;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

/// Descriptors kept out of the sessions' reach: listeners, runtimes (about 25 in all), the
/// probe's connections, health-port connections, and clients being refused.
const HEADROOM: u64 = 64;

/// How many sessions fit under a soft descriptor limit of `soft`, two descriptors each, with
/// the headroom left over.
pub fn session_capacity(soft: u64) -> u32 {
    (soft.saturating_sub(HEADROOM) / 2).min(u64::from(u32::MAX)) as u32
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and warns if it is still short of what
/// `max_clients` sessions need. Returns the soft limit now in force.
pub fn raise_limit(max_clients: u32) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot read the file descriptor limit");
        return 0;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            warn!(error = %io::Error::last_os_error(), "cannot raise the file descriptor limit");
            limit.rlim_cur = before;
        }
    }
    let soft: u64 = limit.rlim_cur;
    let need = 2 * u64::from(max_clients) + HEADROOM;
    if soft < need {
        warn!(
            limit = soft,
            need,
            max_clients,
            sessions = session_capacity(soft),
            "the file descriptor limit is below what max_clients needs (two per session); \
             clients beyond the sessions it allows get 53300. Raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_clients"
        );
    } else if soft != before {
        info!(from = before, to = soft, "raised the file descriptor limit");
    }
    soft
}

/// Whether an accept failed for lack of file descriptors.
pub fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// One descriptor held back (an open /dev/null), to be given up so that one more connection can
/// be accepted and answered when there are none left.
#[derive(Clone, Default)]
pub struct Reserve(Arc<Mutex<Option<std::fs::File>>>);

impl Reserve {
    pub fn new() -> Self {
        let reserve = Reserve::default();
        reserve.restore();
        reserve
    }

    /// Gives the descriptor up. False if it was already given up (another answer is under way).
    pub fn release(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }

    /// Takes a descriptor back into reserve, if one can be had.
    pub fn restore(&self) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = std::fs::File::open("/dev/null").ok();
        }
    }
}
