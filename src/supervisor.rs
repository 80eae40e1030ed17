//! One owner for every long-lived task the agent starts (after Cilium's
//! controllers): each has a name and a state on the [`TaskBoard`] that
//! `/readyz` and the `flannel_task_*` metrics read. A task that can be
//! restarted is restarted with the store backoff when it ends or fails; one
//! whose end means the agent cannot go on (the lease keeper) ends the agent
//! with one message, through [`Supervisor::fatal`].
//!
//! [`TaskBoard`]: crate::metrics::TaskBoard

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::{Metrics, TaskLabel};
use crate::retry::{Backoff, Throttle};

/// A run that lasted this long was healthy: the next failure starts the
/// backoff from its shortest wait, and the task is no longer "failing".
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Records a task as running or not, on the board and in `flannel_task_up`.
fn mark(m: &Metrics, task: &'static str, up: bool) {
    m.task_up
        .get_or_create(&TaskLabel { task })
        .set(i64::from(up));
    m.tasks.set(task, |s| s.up = up);
}

/// What ends the agent: a critical task's end, with its name.
type Ending = Option<(&'static str, anyhow::Error)>;

pub struct Supervisor {
    set: JoinSet<Ending>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>) -> Supervisor {
        Supervisor {
            set: JoinSet::new(),
            metrics,
        }
    }

    /// Runs `make()` and, whenever that run ends (an error, a normal end, or a
    /// panic in a build that unwinds), logs why (throttled), counts a restart
    /// and runs a fresh `make()` after the store backoff.
    pub fn restartable<F, Fut>(&mut self, name: &'static str, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let m = self.metrics.clone();
        self.set.spawn(async move {
            let mut backoff = Backoff::default();
            let mut log = Throttle::new(format!("task {name}"));
            let label = TaskLabel { task: name };
            loop {
                mark(&m, name, true);
                let started = Instant::now();
                let run = AssertUnwindSafe(make()).catch_unwind();
                tokio::pin!(run);
                let mut healthy = false;
                let ended = loop {
                    tokio::select! {
                        r = &mut run => break r,
                        // A run that lasts is healthy: the failing streak ends.
                        _ = tokio::time::sleep(HEALTHY_RUN), if !healthy => {
                            healthy = true;
                            backoff.reset();
                            log.ok();
                            m.tasks.set(name, |s| s.failing = None);
                        }
                    }
                };
                let why = match ended {
                    Ok(Ok(())) => "ended".to_string(),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => "panicked".to_string(),
                };
                mark(&m, name, false);
                m.tasks.set(name, |s| {
                    let since = s.failing.as_ref().map_or(started, |(t, _)| *t);
                    s.failing = Some((since, why.clone()));
                });
                let d = backoff.next_delay();
                log.fail(&format_args!("{why}; restarting it in {d:.1?}"));
                m.task_restarts.get_or_create(&label).inc();
                tokio::time::sleep(d).await;
            }
        });
    }

    /// Runs a task whose end means the agent cannot do its job: when it
    /// returns, [`Supervisor::fatal`] returns its error.
    pub fn critical<Fut>(&mut self, name: &'static str, fut: Fut)
    where
        Fut: Future<Output = anyhow::Error> + Send + 'static,
    {
        let m = self.metrics.clone();
        self.set.spawn(async move {
            mark(&m, name, true);
            let e = fut.await;
            mark(&m, name, false);
            Some((name, e))
        });
    }

    /// Runs a task that loops forever by itself (e.g. a firewall keeper, which
    /// handles its own errors). Should it ever end, that is logged and the task
    /// stays down on the board, so /readyz tells after the bound.
    pub fn forever<Fut>(&mut self, name: &'static str, fut: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let m = self.metrics.clone();
        self.set.spawn(async move {
            mark(&m, name, true);
            fut.await;
            tracing::error!("task {name} ended; it should run as long as the agent");
            mark(&m, name, false);
            m.tasks.set(name, |s| {
                s.failing = Some((Instant::now(), "ended".into()));
            });
            None
        });
    }

    /// Runs a task once; an error is logged, nothing more (e.g. setting the
    /// Node's NetworkUnavailable condition: the dataplane works without it).
    pub fn oneshot<Fut>(&mut self, name: &'static str, fut: Fut)
    where
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.set.spawn(async move {
            if let Err(e) = fut.await {
                tracing::error!("{name}: {e:#}");
            }
            None
        });
    }

    /// Waits until a critical task ends (or any task's panic was not caught),
    /// and returns what the agent exits with. Pending forever otherwise.
    pub async fn fatal(&mut self) -> anyhow::Error {
        loop {
            match self.set.join_next().await {
                None => std::future::pending::<()>().await,
                Some(Ok(None)) => continue,
                Some(Ok(Some((name, e)))) => return e.context(format!("task {name} ended")),
                Some(Err(e)) => return anyhow::anyhow!("a supervised task failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TaskLabel;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn restarts(m: &Metrics, task: &'static str) -> u64 {
        m.task_restarts.get_or_create(&TaskLabel { task }).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_is_restarted_with_backoff_until_it_runs() {
        let m = Arc::new(Metrics::default());
        m.set_ready();
        let mut sup = Supervisor::new(m.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.restartable("drift-monitor", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    anyhow::bail!("subscription ended");
                }
                std::future::pending().await
            }
        });
        let t0 = Instant::now();
        while runs.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Three waits of 0.1-0.2, 0.2-0.4, 0.4-0.8 s.
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited <= Duration::from_millis(1500),
            "{waited:?}"
        );
        assert_eq!(restarts(&m, "drift-monitor"), 3);
        assert_eq!(
            m.task_up
                .get_or_create(&TaskLabel {
                    task: "drift-monitor"
                })
                .get(),
            1
        );
        assert!(m.readiness().is_ok());
        // Running for HEALTHY_RUN ends the failing streak on the board.
        tokio::time::sleep(HEALTHY_RUN + Duration::from_secs(1)).await;
        assert!(m.tasks.snapshot()[0].1.failing.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_keeps_failing_makes_the_agent_unready() {
        let m = Arc::new(Metrics::default());
        m.set_ready();
        let mut sup = Supervisor::new(m.clone());
        sup.restartable("peer-watch", || async { anyhow::bail!("connection reset") });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(m.readiness().is_ok(), "within the bound");
        tokio::time::sleep(Duration::from_secs(8)).await;
        let why = m.readiness().unwrap_err();
        assert!(
            why.contains("task peer-watch keeps failing: connection reset"),
            "{why}"
        );
        // Bounded backoff: it is still being retried, at most every 1.6 s.
        let n = restarts(&m, "peer-watch");
        assert!((8..=130).contains(&n), "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_stays_down_on_the_board() {
        let m = Arc::new(Metrics::default());
        m.set_ready();
        let mut sup = Supervisor::new(m.clone());
        sup.forever("firewall", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        tokio::time::sleep(Duration::from_secs(12)).await;
        let why = m.readiness().unwrap_err();
        assert!(why.contains("task firewall keeps failing: ended"), "{why}");
    }
}
