//! The one place where tests and benchmarks poll with a sleep. Everything that waits for
//! a process, a file or a guest line goes through `poll_until`, so the poll interval and
//! the deadline semantics are decided once.

use std::time::{Duration, Instant};

/// How often to re-check. Short, because benchmarks measure latencies through it; the
/// cost of a check (a `read` of a small file, a `waitpid(WNOHANG)`) is negligible.
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// `Instant::now() + timeout`.
pub fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

/// Calls `check` until it returns `Ok(Some(_))` or an error, or until `deadline` passes
/// (`Ok(None)`). `check` is always called at least once, and once more after the
/// deadline, so a condition that became true during the last sleep is not missed.
pub fn poll_until<T, E>(
    deadline: Instant,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    loop {
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        if Instant::now() >= deadline {
            return check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_out_and_succeeds() {
        let r: Result<Option<()>, ()> =
            poll_until(deadline(Duration::from_millis(20)), || Ok(None));
        assert_eq!(r, Ok(None));
        let mut n = 0;
        let r: Result<Option<i32>, ()> = poll_until(deadline(Duration::from_secs(5)), || {
            n += 1;
            Ok((n == 3).then_some(n))
        });
        assert_eq!(r, Ok(Some(3)));
        let r: Result<Option<()>, &str> = poll_until(deadline(Duration::from_secs(5)), || Err("x"));
        assert_eq!(r, Err("x"));
    }
}
