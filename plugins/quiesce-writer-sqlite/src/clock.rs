//! The two clocks the freeze report gives: UTC for people, CLOCK_MONOTONIC for ordering.

use std::time::SystemTime;

/// This node's CLOCK_MONOTONIC in nanoseconds: the clock every process of the node shares and
/// that never steps, so the freeze can be ordered against events other local processes logged
/// (Python's `time.monotonic_ns()`, `clock_gettime(CLOCK_MONOTONIC)`).
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given; CLOCK_MONOTONIC always exists
    // on Linux, so it cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// `2024-05-06T07:08:09.123Z` (RFC 3339 in UTC, to the millisecond).
pub fn utc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_utc() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a year divisible by 400) and 2024-12-31T23:59:59.999.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723) + Duration::from_millis(45);
        assert_eq!(utc(t), "2000-02-29T01:02:03.045Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_735_689_599_999);
        assert_eq!(utc(t), "2024-12-31T23:59:59.999Z");
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
