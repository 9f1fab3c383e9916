//! Pace and progress of the copy: a rate limit shared by the copying
//! threads, and the one-line progress bar.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::label::{human_bytes, human_rate};

/// A token bucket shared by every reader: reading `n` bytes reserves
/// `n / rate` seconds of the schedule, and a reader whose reservation lies
/// in the future sleeps until then (no busy wait, no lock held while
/// sleeping).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    bytes_per_sec: f64,
    /// When the next read may start.
    next: Mutex<Instant>,
}

/// How far the schedule may lag behind the clock: a reader that paused
/// (storage was slow) may catch up by at most this much, as a burst.
const MAX_BURST: Duration = Duration::from_millis(250);

impl RateLimiter {
    /// A limit of `bytes_per_sec` (at least 1).
    pub(crate) fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter { bytes_per_sec: bytes_per_sec.max(1) as f64, next: Mutex::new(Instant::now()) }
    }

    /// Waits until `bytes` more may be read.
    pub(crate) fn take(&self, bytes: u64) {
        let wait = {
            // A poisoned lock only means another reader panicked; the
            // schedule itself is always consistent.
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(MAX_BURST).unwrap_or(now));
            let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *next = end;
            // This read's bytes are paid for at `end`; reading them earlier
            // than `start` would exceed the rate.
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Bytes copied so far, out of the total the walk found.
#[derive(Debug)]
pub(crate) struct Progress {
    /// Sum of the listed file sizes.
    pub total: u64,
    /// Bytes read so far, updated by the copying threads.
    pub done: AtomicU64,
    started: Instant,
    /// Width of the last line drawn, to blank it.
    drawn: Mutex<usize>,
}

impl Progress {
    /// Progress over `total` bytes, starting now.
    pub(crate) fn new(total: u64) -> Progress {
        Progress { total, done: AtomicU64::new(0), started: Instant::now(), drawn: Mutex::new(0) }
    }

    /// Records `n` more bytes read.
    pub(crate) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The progress line for `done` bytes after `secs` seconds.
    pub(crate) fn line(done: u64, total: u64, secs: f64) -> String {
        let done = done.min(total);
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        format!("{pct:5.1}%  {} of {}  {}", human_bytes(done), human_bytes(total), human_rate(done, secs))
    }

    /// Redraws the line on stderr (`\r`, no newline).
    pub(crate) fn draw(&self) {
        let line = Self::line(self.done.load(Ordering::Relaxed), self.total, self.started.elapsed().as_secs_f64());
        let mut drawn = self.drawn.lock().unwrap_or_else(|e| e.into_inner());
        let pad = drawn.saturating_sub(line.len());
        eprint!("\r{line}{:pad$}", "");
        *drawn = line.len();
    }

    /// Blanks the line if one was drawn.
    pub(crate) fn clear(&self) {
        let drawn = self.drawn.lock().unwrap_or_else(|e| e.into_inner());
        if *drawn > 0 {
            eprint!("\r{:width$}\r", "", width = *drawn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_holds_the_rate() {
        let limiter = RateLimiter::new(20_000);
        let t = Instant::now();
        // 10 reads of 1000 bytes at 20 kB/s: the last starts 9 × 50 ms
        // after the first (a new limiter has no burst to spend).
        for _ in 0..10 {
            limiter.take(1000);
        }
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn limiter_shared_by_threads() {
        let limiter = RateLimiter::new(40_000);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        limiter.take(1000);
                    }
                });
            }
        });
        // 20 reads of 1000 bytes at 40 kB/s: the last starts 19 × 25 ms in.
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    }

    #[test]
    fn progress_line() {
        assert_eq!(Progress::line(512 << 20, 1 << 30, 2.0), " 50.0%  512.0 MiB of 1.0 GiB  256.0 MiB/s");
        assert_eq!(Progress::line(5, 0, 0.0), "100.0%  0 B of 0 B  0.0 MiB/s");
        let p = Progress::new(10);
        p.add(4);
        p.add(4);
        assert_eq!(p.done.load(Ordering::Relaxed), 8);
    }
}
