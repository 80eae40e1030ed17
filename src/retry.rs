//! How the agent waits after a failure talking to its store (API server, etcd):
//! one bounded, jittered backoff for every retry loop, chosen by the failure's
//! [`Cause`], and a log throttle so a repeated error stays visible without
//! flooding the log.
//!
//! Two schedules, because the two kinds of failure cost the server differently:
//! - nobody answered (connection refused or reset, no route): a retry costs the
//!   server nothing, so it is fast (0.1 s doubling to 0.8 s, ≤ 1.6 s with
//!   jitter) and an agent is back within 2 s of a plain outage's end;
//! - a live server said it is overloaded (HTTP 429 or 5xx, etcd
//!   `ResourceExhausted`/`Unavailable` from the server itself): the wait is the
//!   server's `Retry-After` (at least 1 s, APF's value) plus a full jitter over
//!   an exponential window of 1 s doubling to 30 s, as client-go's. That window
//!   shrinks back only after [`SLOW_RESET_AFTER`] without an overload, so one
//!   request let through between rejections does not restart the climb and
//!   5,000 agents spread over 30 s instead of retrying in step.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

/// First wait after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// The doubling stops here; jitter adds up to as much again, so no wait is
/// longer than 2 × MAX_DELAY = 1.6 s. A store that answers again is seen
/// within that (the goal: a peer change in the kernel within 2 s of it).
pub const MAX_DELAY: Duration = Duration::from_millis(800);

/// The overload window starts here and doubles up to [`SLOW_MAX`].
pub const SLOW_MIN: Duration = Duration::from_secs(1);
/// The widest overload window (client-go's informer backoff cap).
pub const SLOW_MAX: Duration = Duration::from_secs(30);
/// An overload this long after the last one (with success in between) starts
/// from the smallest window again.
pub const SLOW_RESET_AFTER: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is taken as this (a hostile or broken
/// value must not park the agent for hours).
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(120);

/// Why a request failed, as far as waiting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nobody answered, or the failure says nothing about the server's load:
    /// retry fast.
    Unreachable,
    /// A live server refused for load; `retry_after` is what it asked for.
    Overloaded { retry_after: Option<Duration> },
}

/// Errors that say which [`Cause`] they are.
pub trait Classify {
    fn cause(&self) -> Cause;
}

/// Exponential backoff, 100 ms doubling to 0.8 s, each wait stretched by a random
/// 0–100 % (so a fleet of agents does not retry in step), never giving up; for
/// overload answers the slower schedule of the module's notes.
pub struct Backoff {
    builder: ExponentialBuilder,
    cur: backon::ExponentialBackoff,
    /// Overloads in the current streak (the window is SLOW_MIN × 2^n).
    slow_level: u32,
    last_overload: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(MIN_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            cur: builder.build(),
            builder,
            slow_level: 0,
            last_overload: None,
        }
    }
}

impl Backoff {
    /// The next wait on the fast schedule (a server that is not there).
    pub fn next_delay(&mut self) -> Duration {
        self.cur.next().unwrap_or(MAX_DELAY)
    }

    /// The next wait after a failure of this cause.
    pub fn delay_for(&mut self, cause: Cause) -> Duration {
        match cause {
            Cause::Unreachable => self.next_delay(),
            Cause::Overloaded { retry_after } => {
                let now = Instant::now();
                if self
                    .last_overload
                    .is_some_and(|t| now.duration_since(t) >= SLOW_RESET_AFTER)
                {
                    self.slow_level = 0;
                }
                self.last_overload = Some(now);
                let window = SLOW_MIN
                    .saturating_mul(1 << self.slow_level.min(5))
                    .min(SLOW_MAX);
                self.slow_level = self.slow_level.saturating_add(1);
                let floor = retry_after
                    .unwrap_or(SLOW_MIN)
                    .clamp(SLOW_MIN, RETRY_AFTER_CAP);
                floor + window.mul_f64(rand::random::<f64>())
            }
        }
    }

    /// After a success: the next unreachable-server failure starts from the
    /// shortest wait again (the overload window shrinks with time instead).
    pub fn reset(&mut self) {
        self.cur = self.builder.build();
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

/// Logs the first failure of a kind at once, then at most one line per
/// `every`, with how many were not shown; [`Throttle::ok`] ends the streak
/// and logs the recovery.
pub struct Throttle {
    what: String,
    every: Duration,
    last: Option<Instant>,
    hidden: u32,
    failing: bool,
}

impl Throttle {
    pub fn new(what: impl Into<String>) -> Throttle {
        Throttle {
            what: what.into(),
            every: Duration::from_secs(10),
            last: None,
            hidden: 0,
            failing: false,
        }
    }

    /// Records a failure; returns whether it was logged.
    pub fn fail(&mut self, e: &dyn Display) -> bool {
        self.failing = true;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.hidden += 1;
            return false;
        }
        if self.hidden > 0 {
            tracing::warn!("{}: {e} (and {} more failures)", self.what, self.hidden);
        } else {
            tracing::warn!("{}: {e}", self.what);
        }
        self.last = Some(now);
        self.hidden = 0;
        true
    }

    /// Records a success; logs once when it ends a streak of failures.
    pub fn ok(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("{}: working again", self.what);
        }
        self.last = None;
        self.hidden = 0;
    }

    pub fn failing(&self) -> bool {
        self.failing
    }
}

/// Runs `f` until it succeeds or fails with an error `fatal` says cannot heal
/// (returned at once). Transient errors wait with [`Backoff`] by their
/// [`Cause`] and are logged through a [`Throttle`] named `what`.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    fatal: impl Fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    E: Display + Classify,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    let mut log = Throttle::new(what);
    loop {
        match f().await {
            Ok(v) => {
                log.ok();
                return Ok(v);
            }
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => {
                let d = backoff.delay_for(e.cause());
                log.fail(&format_args!("{e}; retrying in {d:.1?}"));
                tokio::time::sleep(d).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In these tests a string error names its cause.
    impl Classify for String {
        fn cause(&self) -> Cause {
            match self.as_str() {
                "busy" => Cause::Overloaded { retry_after: None },
                "busy5" => Cause::Overloaded {
                    retry_after: Some(Duration::from_secs(5)),
                },
                _ => Cause::Unreachable,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn overload_waits_honour_retry_after_grow_to_30s_and_reset_after_quiet() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..40)
            .map(|_| b.delay_for(Cause::Overloaded { retry_after: None }))
            .collect();
        // Never under the 1 s floor, never over floor + 30 s.
        assert!(
            waits
                .iter()
                .all(|d| *d >= SLOW_MIN && *d <= SLOW_MIN + SLOW_MAX),
            "{waits:?}"
        );
        // The window grows: the first is within 1 + 1 s, late ones spread wide.
        assert!(waits[0] <= 2 * SLOW_MIN, "{waits:?}");
        assert!(
            waits[10..].iter().any(|d| *d > Duration::from_secs(10)),
            "{waits:?}"
        );
        // Full jitter: the late waits differ.
        let distinct: std::collections::HashSet<_> = waits[10..].iter().collect();
        assert!(distinct.len() > 20, "{waits:?}");
        // Retry-After is a floor.
        let d = b.delay_for(Cause::Overloaded {
            retry_after: Some(Duration::from_secs(7)),
        });
        assert!(d >= Duration::from_secs(7), "{d:?}");
        // An absurd Retry-After is capped.
        let d = b.delay_for(Cause::Overloaded {
            retry_after: Some(Duration::from_secs(86400)),
        });
        assert!(d <= RETRY_AFTER_CAP + SLOW_MAX, "{d:?}");
        // A success does not shrink the window at once ...
        b.reset();
        let d = b.delay_for(Cause::Overloaded { retry_after: None });
        assert!(d <= SLOW_MIN + SLOW_MAX);
        // ... a minute without overload does.
        tokio::time::advance(SLOW_RESET_AFTER).await;
        let d = b.delay_for(Cause::Overloaded { retry_after: None });
        assert!(d <= 2 * SLOW_MIN, "{d:?}");
        // The fast schedule is unaffected by the slow one.
        assert!(b.delay_for(Cause::Unreachable) <= 2 * MIN_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_waits_by_cause() {
        let started = Instant::now();
        let mut n = 0;
        let r: Result<u32, String> = until_ok(
            "test",
            |_: &String| false,
            || {
                n += 1;
                let k = n;
                async move {
                    if k == 1 {
                        Err("busy5".to_string())
                    } else {
                        Ok(k)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(2));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited <= Duration::from_secs(6),
            "{waited:?}"
        );
    }

    #[test]
    fn backoff_is_bounded_jittered_and_resets() {
        let mut b = Backoff::default();
        let first: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(
            first[0] >= MIN_DELAY && first[0] <= 2 * MIN_DELAY,
            "{first:?}"
        );
        assert!(first.iter().all(|d| *d <= 2 * MAX_DELAY), "{first:?}");
        // It grows to the cap: the late waits are at least MAX_DELAY.
        assert!(first[6..].iter().all(|d| *d >= MAX_DELAY), "{first:?}");
        b.reset();
        assert!(b.next_delay() <= 2 * MIN_DELAY);
        // Jitter: 40 capped waits are not all the same.
        let late: std::collections::HashSet<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(late.len() > 1);
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_retries_transient_and_stops_on_fatal() {
        let mut n = 0;
        let started = Instant::now();
        let r: Result<u32, String> = until_ok(
            "test",
            |e: &String| e == "fatal",
            || {
                n += 1;
                let k = n;
                async move {
                    if k < 5 {
                        Err("transient".to_string())
                    } else {
                        Ok(k)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(5));
        // Four waits: 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1500) && waited <= Duration::from_millis(3000),
            "{waited:?}"
        );
        let r: Result<u32, String> = until_ok(
            "test",
            |e: &String| e == "fatal",
            || async { Err("fatal".to_string()) },
        )
        .await;
        assert_eq!(r, Err("fatal".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_logs_first_then_once_per_period() {
        let mut t = Throttle::new("x");
        assert!(t.fail(&"a"));
        assert!(!t.fail(&"b"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(t.fail(&"c"));
        assert!(t.failing());
        t.ok();
        assert!(!t.failing());
        assert!(t.fail(&"d"), "a new streak logs at once");
    }
}
