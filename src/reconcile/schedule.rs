//! When the reconciler runs, and in which scope: pure bookkeeping over tokio's
//! clock, so it is tested with paused time. Lease events ask for an incremental
//! pass at once; netlink drift asks for a full pass after a short debounce (a
//! burst of events is one pass); the safety timer and start-up ask for a full
//! pass now; a failed pass is retried as a full pass with a growing delay.

use std::time::Duration;

use tokio::time::Instant;

/// Coalesces bursts of netlink events into one re-check.
pub const DRIFT_DEBOUNCE: Duration = Duration::from_millis(50);
/// The first retry after a failed pass; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(400);
/// Kernel failures (e.g. a route via a link that is down) are retried at least
/// this often; the link's own up event brings the next pass sooner.
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Only the peers whose lease changed, against what was applied.
    Scoped,
    /// Everything, against a fresh kernel dump.
    Full,
}

#[derive(Debug, Default)]
pub struct Schedule {
    /// When the next full pass is due (None: not asked for).
    full_at: Option<Instant>,
    failures: u32,
}

impl Schedule {
    /// A full pass as soon as possible (first peer list, safety timer).
    pub fn full_now(&mut self) {
        self.full_at = Some(Instant::now());
    }

    /// The kernel deviated: a full pass after the debounce, unless one is due sooner.
    pub fn drift(&mut self) {
        let soon = Instant::now() + DRIFT_DEBOUNCE;
        if self.full_at.is_none_or(|t| soon < t) {
            self.full_at = Some(soon);
        }
    }

    /// When to wake up for a due full pass.
    pub fn deadline(&self) -> Option<Instant> {
        self.full_at
    }

    /// What to run now: `dirty` = lease events changed the peer set, `known` =
    /// every plane's kernel state is known (else only a full pass will do).
    pub fn decide(&mut self, dirty: bool, known: bool) -> Option<Pass> {
        let due = self.full_at.is_some_and(|t| Instant::now() >= t);
        if due || (!known && dirty) {
            self.full_at = None;
            return Some(Pass::Full);
        }
        dirty.then_some(Pass::Scoped)
    }

    /// Records a pass's outcome; a failure schedules a full pass with backoff.
    pub fn done(&mut self, ok: bool) {
        if ok {
            self.failures = 0;
            return;
        }
        self.failures += 1;
        let delay = FIRST_RETRY
            .saturating_mul(1 << (self.failures - 1).min(10))
            .min(MAX_RETRY);
        let at = Instant::now() + delay;
        if self.full_at.is_none_or(|t| at < t) {
            self.full_at = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    #[tokio::test(start_paused = true)]
    async fn lease_events_run_scoped_at_once() {
        let mut s = Schedule::default();
        assert_eq!(s.decide(true, true), Some(Pass::Scoped));
        assert_eq!(s.decide(false, true), None);
        // Kernel state unknown (a failed pass before): only a full pass will do.
        assert_eq!(s.decide(true, false), Some(Pass::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_drift_events_is_one_full_pass() {
        let mut s = Schedule::default();
        s.drift();
        advance(Duration::from_millis(10)).await;
        s.drift();
        advance(Duration::from_millis(30)).await;
        s.drift();
        // Not yet: the first event's debounce has not run out.
        assert_eq!(s.decide(false, true), None);
        advance(Duration::from_millis(10)).await;
        assert_eq!(s.decide(false, true), Some(Pass::Full));
        assert_eq!(s.decide(false, true), None, "one pass for the burst");
        assert_eq!(s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_full_pass_wins_over_a_scoped_one() {
        let mut s = Schedule::default();
        s.full_now();
        assert_eq!(s.decide(true, true), Some(Pass::Full));
        assert_eq!(s.decide(true, true), Some(Pass::Scoped));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_success_resets() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        let mut waits = vec![];
        for _ in 0..9 {
            s.done(false);
            let d = s.deadline().unwrap();
            waits.push(d - t0);
            advance(d - Instant::now()).await;
            assert_eq!(s.decide(false, false), Some(Pass::Full));
        }
        // 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, then capped at 30 s.
        let secs: Vec<f64> = waits
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        assert_eq!(waits[0], Duration::from_millis(400));
        assert!((secs[0] - 0.8).abs() < 1e-9, "{secs:?}");
        assert!(
            (secs[6] - 30.0).abs() < 1e-9 && (secs[7] - 30.0).abs() < 1e-9,
            "{secs:?}"
        );
        s.done(true);
        s.done(false);
        let d = s.deadline().unwrap() - Instant::now();
        assert_eq!(
            d,
            Duration::from_millis(400),
            "a success resets the backoff"
        );
        // Drift while backing off brings the pass forward.
        s.drift();
        assert_eq!(s.deadline().unwrap() - Instant::now(), DRIFT_DEBOUNCE);
    }
}
