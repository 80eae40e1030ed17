//! The agent's event loop: lease events, drift kicks, the retry schedule and
//! the safety timer in; reconcile passes out. It owns no kernel or store
//! state — [`Passes`] does — so it is tested here with paused time and a fake.
//!
//! Rules it keeps:
//! - a burst of lease events (what is already queued) is one pass;
//! - before the first complete peer list nothing is programmed and no
//!   timer is armed (a due full pass waits for the list instead of spinning);
//! - a critical task's end (the supervisor's [`Supervisor::fatal`]) ends it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::manager::LeaseEvent;
use crate::metrics::Metrics;
use crate::reconcile::schedule::{Pass, Schedule};
use crate::supervisor::Supervisor;

/// What the loop drives: the reconciler, or a fake in tests.
pub trait Passes {
    /// Folds one lease event in; true if the accepted peers changed.
    fn handle(&mut self, ev: LeaseEvent) -> bool;
    /// One pass; true when the kernel holds what is wanted.
    fn reconcile(&mut self, full: bool) -> impl Future<Output = bool>;
    /// Whether every plane's kernel state is known (else only a full pass will do).
    fn applied_known(&self) -> bool;
    /// The first successful pass after the first list: the agent is ready.
    fn first_ready(&mut self, sup: &mut Supervisor);
}

pub struct Inputs {
    pub events: mpsc::Receiver<LeaseEvent>,
    pub kicks: mpsc::Receiver<()>,
    /// Full re-check even without events (a backstop).
    pub safety: Duration,
}

/// Runs until a critical task ends or the event sources are gone; returns why.
pub async fn run<P: Passes>(
    p: &mut P,
    mut inp: Inputs,
    sup: &mut Supervisor,
    metrics: Arc<Metrics>,
) -> anyhow::Error {
    let mut synced = false;
    let mut completed = false;
    let mut schedule = Schedule::default();
    let mut safety = tokio::time::interval(inp.safety);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    safety.tick().await;
    loop {
        metrics.loop_wakeups.inc();
        // No timer before the first list: what is due then waits for it.
        let deadline = schedule.deadline().filter(|_| synced);
        let mut dirty = false;
        tokio::select! {
            ev = inp.events.recv() => {
                let Some(ev) = ev else { return anyhow::anyhow!("the peer watch stopped") };
                // This event and what is already queued: one reconcile per burst.
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    if matches!(ev, LeaseEvent::Snapshot(_)) {
                        if !synced {
                            schedule.full_now();
                        }
                        synced = true;
                    }
                    dirty |= p.handle(ev);
                    next = inp.events.try_recv().ok();
                }
            }
            Some(()) = inp.kicks.recv() => schedule.drift(),
            _ = sleep_until(deadline) => {}
            _ = safety.tick() => schedule.full_now(),
            e = sup.fatal() => return e,
        }
        if !synced {
            continue;
        }
        let Some(pass) = schedule.decide(dirty, p.applied_known()) else {
            continue;
        };
        let ok = p.reconcile(pass == Pass::Full).await;
        schedule.done(ok);
        if ok && !completed {
            completed = true;
            p.first_ready(sup);
        }
    }
}

/// Sleeps until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
