//! The relay's clock: a monotonic instant as a count of nanoseconds.
//!
//! A session reads the clock about twice per request and does arithmetic on what it read
//! several times (a request's duration, its deadline, the earliest of the session's deadlines).
//! With `std`'s and tokio's `Instant`, a seconds-and-nanoseconds pair, each difference and sum
//! normalises the nanoseconds and checks for overflow: about a hundred instructions per
//! request in all. Here a difference is one subtraction and a comparison one compare. Read
//! from `CLOCK_MONOTONIC`, the clock `std::time::Instant` reads on Linux; converted to tokio's
//! `Instant` only to arm a timer.

use std::ops::{Add, Sub};
use std::sync::OnceLock;
use std::time::Duration;

/// A moment on the monotonic clock, in nanoseconds since an unspecified start (boot on Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

const NANOS: u64 = 1_000_000_000;

fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(NANOS)
        .saturating_add(u64::from(d.subsec_nanos()))
}

impl Instant {
    /// Now.
    #[inline]
    pub fn now() -> Instant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux,
        // so the call cannot fail (if it did, `ts` stays zero: the start of the clock).
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Instant((ts.tv_sec as u64).wrapping_mul(NANOS) + ts.tv_nsec as u64)
    }

    /// How long after `earlier` this is; zero if it is not after it.
    #[inline]
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Whole microseconds from `earlier` to this; zero if this is not after it.
    #[inline]
    pub fn micros_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0) / 1000
    }

    /// The same moment as tokio's `Instant`, to arm a timer: never earlier than this one, and
    /// later by at most the time between the anchor's two reads (see [`anchor`]).
    pub fn into_tokio(self) -> tokio::time::Instant {
        let (at, std) = anchor();
        tokio::time::Instant::from_std(if self >= at {
            std + self.saturating_duration_since(at)
        } else {
            std.checked_sub(at.saturating_duration_since(self))
                .unwrap_or(std)
        })
    }

    /// The moment tokio's `Instant` `t` stands for on this clock (the inverse of
    /// [`Instant::into_tokio`]; no later than `t`, by at most the same margin).
    pub fn from_tokio(t: tokio::time::Instant) -> Instant {
        let (at, std) = anchor();
        let t = t.into_std();
        if t >= std {
            at + (t - std)
        } else {
            at - (std - t)
        }
    }
}

/// A moment on both clocks: this clock read, then `std`'s `Instant` read just after it and paired
/// with it. Whatever moment `std`'s read stands for is no earlier than this clock's read, so
/// [`Instant::into_tokio`] never converts to an earlier moment, and a timer armed for a deadline
/// never fires before this clock says the deadline has passed.
fn anchor() -> (Instant, std::time::Instant) {
    static ANCHOR: OnceLock<(Instant, std::time::Instant)> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        let before = Instant::now();
        (before, std::time::Instant::now())
    })
}

impl Add<Duration> for Instant {
    type Output = Instant;

    #[inline]
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(nanos(d)))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;

    #[inline]
    fn sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(nanos(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_same_clock_as_std_and_never_converts_earlier() {
        let before = std::time::Instant::now();
        let ours = Instant::now();
        let after = std::time::Instant::now();
        let converted = ours.into_tokio().into_std();
        // Never before a moment read before ours; later by at most the anchor's two reads.
        assert!(converted >= before, "{converted:?} vs {before:?}");
        assert!(
            converted <= after + Duration::from_millis(5),
            "{converted:?} vs {after:?}"
        );
        // And back.
        let back = Instant::from_tokio(ours.into_tokio());
        assert!(back <= ours && ours.saturating_duration_since(back) < Duration::from_millis(5));
        let later = Instant::now() + Duration::from_secs(3);
        let d = later.into_tokio().into_std() - std::time::Instant::now();
        assert!(
            d > Duration::from_millis(2900) && d <= Duration::from_secs(3),
            "{d:?}"
        );
        // A timer armed for a deadline fires no earlier than the deadline on this clock.
        let deadline = Instant::now() + Duration::from_millis(20);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async { tokio::time::sleep_until(deadline.into_tokio()).await });
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Instant(5);
        assert_eq!(t - Duration::from_nanos(9), Instant(0));
        assert_eq!(t + Duration::MAX, Instant(u64::MAX));
        assert_eq!(Instant(3).saturating_duration_since(t), Duration::ZERO);
        assert_eq!(
            t.saturating_duration_since(Instant(2)),
            Duration::from_nanos(3)
        );
        assert_eq!(Instant(5_432_100).micros_since(Instant(100)), 5_432);
        assert_eq!(t + Duration::from_secs(1), Instant(1_000_000_005));
    }
}
