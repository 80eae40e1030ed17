//! How the agent waits after a failure talking to its store (API server, etcd):
//! one bounded, jittered, reset-on-success backoff for every retry loop, and a
//! log throttle so a repeated error stays visible without flooding the log.

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

/// Exponential backoff, 100 ms doubling to 0.8 s, each wait stretched by a random
/// 0–100 % (so a fleet of agents does not retry in step), never giving up.
pub struct Backoff {
    builder: ExponentialBuilder,
    cur: backon::ExponentialBackoff,
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
        }
    }
}

impl Backoff {
    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        self.cur.next().unwrap_or(MAX_DELAY)
    }

    /// After a success: the next failure starts from the shortest wait again.
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
/// (returned at once). Transient errors wait with [`Backoff`] and are logged
/// through a [`Throttle`] named `what`.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    fatal: impl Fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    E: Display,
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
                let d = backoff.next_delay();
                log.fail(&format_args!("{e}; retrying in {d:.1?}"));
                tokio::time::sleep(d).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
