//! One list, then a watch for ever: the way every agent follows a kind of
//! object (Nodes; Pods, Namespaces and NetworkPolicies for `--network-policy`)
//! while costing the API server as little as a client can.
//!
//! - The list asks for `resourceVersion=0`: the API server answers from its
//!   watch cache, in one response, without reading etcd. The cache may be a
//!   moment behind etcd; the watch that follows starts at the list's
//!   resourceVersion and brings every later change, so the agent converges on
//!   the same state as after a quorum read, a few milliseconds later at most.
//! - A watch that ends (the server's timeout) or breaks (a dropped connection)
//!   resumes from the last resourceVersion seen (bookmarks keep it fresh in a
//!   quiet cluster) without a list. Only `410 Gone` (the version is older than
//!   the server keeps, as after an API server restart) lists again, at once.
//! - Failures wait by their [`Cause`]: fast while nobody answers, the server's
//!   `Retry-After` and a widening, fully jittered window while it answers 429/5xx.

use std::fmt::Debug;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::Resource;
use serde::de::DeserializeOwned;

use super::list::{self, Read};
use crate::retry::{Backoff, Cause, Classify};

/// What the stream yields.
#[derive(Debug)]
pub enum Item<K> {
    /// A list begins: the objects it [`Item::Found`], once [`Item::Listed`]
    /// ends it, replace everything known of this kind. A failure before
    /// that ends the list unfinished (a new one begins later).
    Listing,
    /// One object of the list being read (decoded as it arrives).
    Found(K),
    /// The list is complete.
    Listed,
    Applied(K),
    Deleted(K),
    /// A watch (re)started: the API server is answering again.
    Watching,
    /// A request failed; the stream waits `delay` before the next one.
    Failed(Failure),
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub why: String,
    pub delay: Duration,
    /// The next request is a list (the resourceVersion is gone).
    pub relist: bool,
}

/// Where a list/watch is.
struct Follow<K: Resource + Clone + DeserializeOwned + Debug + Send + 'static> {
    api: Api<K>,
    list: ListParams,
    watch: WatchParams,
    /// Resume point; None: list next.
    rv: Option<String>,
    stream: Option<BoxStream<'static, kube::Result<WatchEvent<K>>>>,
    /// The list being read.
    reading: Option<list::ListReader<K>>,
    backoff: Backoff,
    wait: Option<Duration>,
}

/// Lists (from the watch cache) and watches `api`'s kind, with `fields` as a
/// field selector, each watch ended by the server after `timeout_s`.
pub fn follow<K>(api: Api<K>, fields: Option<&str>, timeout_s: u32) -> impl Stream<Item = Item<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut list = ListParams::default().match_any();
    let mut watch = WatchParams::default().timeout(timeout_s);
    if let Some(f) = fields {
        list = list.fields(f);
        watch = watch.fields(f);
    }
    let st = Follow {
        api,
        list,
        watch,
        rv: None,
        stream: None,
        reading: None,
        backoff: Backoff::default(),
        wait: None,
    };
    futures::stream::unfold(st, |mut st| async move {
        let item = st.step().await;
        Some((item, st))
    })
}

impl<K> Follow<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    async fn step(&mut self) -> Item<K> {
        if let Some(d) = self.wait.take() {
            tokio::time::sleep(d).await;
        }
        loop {
            if let Some(s) = self.stream.as_mut() {
                match s.next().await {
                    Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                        self.seen(&o);
                        return Item::Applied(o);
                    }
                    Some(Ok(WatchEvent::Deleted(o))) => {
                        self.seen(&o);
                        return Item::Deleted(o);
                    }
                    Some(Ok(WatchEvent::Bookmark(b))) => {
                        self.rv = Some(b.metadata.resource_version);
                    }
                    Some(Ok(WatchEvent::Error(s))) => {
                        self.stream = None;
                        return self.failed(&kube::Error::Api(s));
                    }
                    Some(Err(e)) => {
                        // The connection broke mid-watch: resume after the wait.
                        self.stream = None;
                        return self.failed(&e);
                    }
                    // The server ended the watch (its timeout): resume now.
                    None => self.stream = None,
                }
                continue;
            }
            if let Some(r) = self.reading.as_mut() {
                return match r.next().await {
                    Ok(Read::Item(k)) => Item::Found(k),
                    Ok(Read::End(rv)) => self.listed(rv),
                    Err(e) => {
                        self.reading = None;
                        self.failed(&e)
                    }
                };
            }
            let Some(rv) = self.rv.clone() else {
                return match list::start(&self.api, &self.list).await {
                    Ok(r) => {
                        self.reading = Some(r);
                        Item::Listing
                    }
                    Err(e) => self.failed(&e),
                };
            };
            return match self.api.watch(&self.watch, &rv).await {
                Ok(s) => {
                    self.stream = Some(s.boxed());
                    self.backoff.reset();
                    Item::Watching
                }
                Err(e) => self.failed(&e),
            };
        }
    }

    /// The list read to its end: the watch resumes from its resourceVersion.
    fn listed(&mut self, rv: Option<String>) -> Item<K> {
        let Some(r) = self.reading.take() else {
            return Item::Listed;
        };
        if r.skipped > 0 {
            tracing::warn!(
                "{}: {} object(s) of the list did not decode and were left out (first: {})",
                self.api.resource_url(),
                r.skipped,
                r.first_error.as_deref().unwrap_or_default()
            );
        }
        match rv.filter(|v| !v.is_empty()) {
            Some(v) => {
                self.rv = Some(v);
                self.backoff.reset();
                Item::Listed
            }
            None => self.failed_why(
                "the list carried no resourceVersion".into(),
                Cause::Unreachable,
            ),
        }
    }

    fn seen(&mut self, o: &K) {
        if let Some(v) = o.meta().resource_version.as_ref().filter(|v| !v.is_empty()) {
            self.rv = Some(v.clone());
        }
    }

    fn failed(&mut self, e: &kube::Error) -> Item<K> {
        if gone(e) {
            // Too old a resourceVersion: list again now, never wait.
            self.rv = None;
            return Item::Failed(Failure {
                why: e.to_string(),
                delay: Duration::ZERO,
                relist: true,
            });
        }
        self.failed_why(describe(e), e.cause())
    }

    fn failed_why(&mut self, why: String, cause: Cause) -> Item<K> {
        let delay = self.backoff.delay_for(cause);
        self.wait = Some(delay);
        Item::Failed(Failure {
            why,
            delay,
            relist: self.rv.is_none(),
        })
    }
}

/// `410 Gone`: the resourceVersion is older than the server keeps.
fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// The error, with a hint where the cause is a known, passing one.
fn describe(e: &kube::Error) -> String {
    let rbac = matches!(e, kube::Error::Api(s) if s.code == 403 || s.code == 401);
    if rbac {
        format!("{e} (RBAC: flanneld needs list/watch here; normal for a second after an API server restart)")
    } else {
        e.to_string()
    }
}

/// What kube-rs calls an error answer that is not an API server's Status.
const NOT_A_STATUS: &str = "Failed to parse error data";

/// 429 and 5xx come from a live server that asks for less load; everything
/// else (no connection, a reset, a timeout, 401/403 while RBAC syncs) is retried
/// fast, and so is a 502/503/504 that is not an API server's Status: a load
/// balancer or proxy whose API server is not there.
impl Classify for kube::Error {
    fn cause(&self) -> Cause {
        match self {
            kube::Error::Api(s) if matches!(s.code, 502..=504) && s.reason == NOT_A_STATUS => {
                Cause::Unreachable
            }
            kube::Error::Api(s) if s.code == 429 || s.code >= 500 => Cause::Overloaded {
                retry_after: s
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(s.into())),
            },
            _ => Cause::Unreachable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Status as the API server writes it (429s carry details.retryAfterSeconds).
    fn status(code: u16, retry_after: u32) -> kube::Error {
        let mut j = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "x", "reason": "TooManyRequests", "code": code,
        });
        if retry_after > 0 {
            j["details"] = serde_json::json!({ "retryAfterSeconds": retry_after });
        }
        kube::Error::Api(Box::new(serde_json::from_value(j).unwrap()))
    }

    #[test]
    fn causes_of_api_errors() {
        assert_eq!(
            status(429, 3).cause(),
            Cause::Overloaded {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            status(503, 0).cause(),
            Cause::Overloaded { retry_after: None }
        );
        assert_eq!(status(403, 0).cause(), Cause::Unreachable);
        // A gateway's own answer (plain text), as kube-rs reconstructs it.
        let lb = kube::core::Status::failure("no healthy upstream", NOT_A_STATUS).with_code(503);
        assert_eq!(kube::Error::Api(Box::new(lb)).cause(), Cause::Unreachable);
        let lb = kube::core::Status::failure("busy", NOT_A_STATUS).with_code(429);
        assert_eq!(
            kube::Error::Api(Box::new(lb)).cause(),
            Cause::Overloaded { retry_after: None }
        );
        assert_eq!(status(404, 0).cause(), Cause::Unreachable);
        assert!(gone(&status(410, 0)));
        assert!(!gone(&status(500, 0)));
        assert!(describe(&status(403, 0)).contains("RBAC"));
    }
}
