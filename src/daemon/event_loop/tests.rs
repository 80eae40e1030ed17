//! The event loop under paused time, driving a fake reconciler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{advance, Instant};

use super::{run, Inputs, Passes};
use crate::manager::LeaseEvent;
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;

#[derive(Default)]
struct Record {
    handled: usize,
    /// (full?, when) of every pass.
    passes: Vec<(bool, Instant)>,
    /// Passes still to fail.
    fail: usize,
    ready: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Record>>);

impl Fake {
    fn rec(&self) -> std::sync::MutexGuard<'_, Record> {
        self.0.lock().unwrap()
    }
}

impl Passes for Fake {
    fn handle(&mut self, _ev: LeaseEvent) -> bool {
        self.rec().handled += 1;
        true
    }
    async fn reconcile(&mut self, full: bool) -> bool {
        let mut r = self.rec();
        r.passes.push((full, Instant::now()));
        if r.fail > 0 {
            r.fail -= 1;
            return false;
        }
        true
    }
    fn applied_known(&self) -> bool {
        let r = self.rec();
        r.passes.last().is_some() && r.fail == 0
    }
    fn first_ready(&mut self, _sup: &mut Supervisor) {
        self.rec().ready += 1;
    }
}

struct Harness {
    fake: Fake,
    events: mpsc::Sender<LeaseEvent>,
    kicks: mpsc::Sender<()>,
    metrics: Arc<Metrics>,
    ended: tokio::task::JoinHandle<String>,
}

fn start(setup: impl FnOnce(&mut Supervisor)) -> Harness {
    let fake = Fake::default();
    let metrics = Arc::new(Metrics::default());
    let (events, rx) = mpsc::channel(100_000);
    let (kicks, krx) = mpsc::channel(1);
    let mut sup = Supervisor::new(metrics.clone());
    setup(&mut sup);
    let (mut f, m) = (fake.clone(), metrics.clone());
    let ended = tokio::spawn(async move {
        let inputs = Inputs {
            events: rx,
            kicks: krx,
            safety: Duration::from_secs(300),
        };
        format!("{:#}", run(&mut f, inputs, &mut sup, m).await)
    });
    Harness {
        fake,
        events,
        kicks,
        metrics,
        ended,
    }
}

/// Lets every runnable task run; returns how often the loop woke meanwhile.
async fn settle(h: &Harness) -> u64 {
    let before = h.metrics.loop_wakeups.get();
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    h.metrics.loop_wakeups.get() - before
}

fn upsert(n: usize) -> LeaseEvent {
    LeaseEvent::Upsert(format!("n{n}"), Ok(None))
}

#[tokio::test(start_paused = true)]
async fn no_spin_while_the_first_list_is_refused() {
    let h = start(|_| {});
    settle(&h).await;
    // A drift kick and the safety timer come due: both ask for a full pass
    // that only the list can allow.
    h.kicks.send(()).await.unwrap();
    settle(&h).await;
    advance(Duration::from_secs(301)).await;
    settle(&h).await;
    // Parked: a thousand chances to run, not one turn taken.
    assert_eq!(settle(&h).await, 0, "the loop spins before the first list");
    assert!(h.fake.rec().passes.is_empty(), "no pass before the list");
    // The list arrives: one full pass, then the agent is ready.
    h.events.send(LeaseEvent::Snapshot(vec![])).await.unwrap();
    settle(&h).await;
    let r = h.fake.rec();
    assert_eq!(r.passes.len(), 1);
    assert!(r.passes[0].0, "the first pass after the list is full");
    assert_eq!(r.ready, 1);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_lease_events_is_one_scoped_pass() {
    let h = start(|_| {});
    h.events.send(LeaseEvent::Snapshot(vec![])).await.unwrap();
    settle(&h).await;
    // Queued while the loop is busy elsewhere (no await between them).
    for i in 0..500 {
        h.events.try_send(upsert(i)).unwrap();
    }
    settle(&h).await;
    let (handled, kinds) = {
        let r = h.fake.rec();
        (
            r.handled,
            r.passes.iter().map(|p| p.0).collect::<Vec<bool>>(),
        )
    };
    assert_eq!(handled, 501);
    assert_eq!(
        kinds,
        vec![true, false],
        "snapshot: full; burst: one scoped"
    );
    // Idle: nothing wakes the loop.
    advance(Duration::from_secs(60)).await;
    assert_eq!(settle(&h).await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_pass_is_retried_full_with_backoff_and_drift_coalesces() {
    let h = start(|_| {});
    h.fake.rec().fail = 2;
    let t0 = Instant::now();
    h.events.send(LeaseEvent::Snapshot(vec![])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle(&h).await;
    {
        let r = h.fake.rec();
        let at: Vec<u128> = r.passes.iter().map(|p| (p.1 - t0).as_millis()).collect();
        assert_eq!(at, vec![0, 400, 1200], "retries after 0.4 s, then 0.8 s");
        assert!(r.passes.iter().all(|p| p.0), "retries are full passes");
        assert_eq!(r.ready, 1);
    }
    // Ten drift kicks within the debounce: one full pass.
    for _ in 0..10 {
        let _ = h.kicks.try_send(());
        settle(&h).await;
        advance(Duration::from_millis(4)).await;
    }
    advance(Duration::from_millis(100)).await;
    settle(&h).await;
    assert_eq!(h.fake.rec().passes.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_critical_task_ends_the_loop_with_its_message() {
    let h = start(|sup| {
        sup.critical("lease-keeper", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            anyhow::anyhow!("our subnet is now held by another node")
        });
        sup.restartable("flaky", || async { anyhow::bail!("socket closed") });
    });
    h.events.send(LeaseEvent::Snapshot(vec![])).await.unwrap();
    let t0 = Instant::now();
    let msg = h.ended.await.unwrap();
    assert_eq!(t0.elapsed().as_secs(), 5);
    assert!(msg.contains("task lease-keeper ended"), "{msg}");
    assert!(msg.contains("held by another node"), "{msg}");
    // The flaky task was restarted meanwhile, not allowed to end the agent.
    let restarts = h
        .metrics
        .task_restarts
        .get_or_create(&crate::metrics::TaskLabel { task: "flaky" })
        .get();
    assert!((3..=50).contains(&restarts), "{restarts}");
}
