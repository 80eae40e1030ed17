//! A Kubernetes list response read as it arrives: each of its `items` is
//! handed over (and can be folded and dropped) as soon as its last byte is
//! in, so a list of 50,000 objects never sits in memory whole — neither as
//! the response body (kube-rs' `Api::list` buffers it, copies it and decodes
//! the copy at once) nor as 50,000 decoded objects.
//!
//! [`Splitter`] only finds the boundaries (strings, escapes, nesting) of the
//! top-level object's `metadata` and of each element of its `items`; each
//! piece is then decoded on its own by serde_json, so one object that does
//! not decode is skipped and counted instead of failing the list.

use std::collections::VecDeque;
use std::pin::Pin;

use futures::{AsyncBufRead, AsyncBufReadExt};
use kube::api::{Api, ListParams};
use kube::Resource;
use serde::de::DeserializeOwned;

/// What the splitter is copying out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    /// The list's `metadata` (ends back at depth 1).
    Meta,
    /// One element of `items` (ends back at depth 2).
    Item,
}

/// The structural scanner over a list's bytes, fed chunk by chunk.
#[derive(Debug)]
pub struct Splitter {
    depth: u32,
    in_str: bool,
    esc: bool,
    /// At depth 1, the next string is a key.
    want_key: bool,
    /// The string being read is a depth-1 key.
    reading_key: bool,
    /// The last depth-1 key: which member's value the scanner is inside.
    key: Vec<u8>,
    capture: Capture,
    buf: Vec<u8>,
    /// Complete items, not yet taken.
    pub items: VecDeque<Vec<u8>>,
    /// The list's metadata, once read.
    pub meta: Option<Vec<u8>>,
    /// Bytes seen after the top-level object closed, or a close without an open.
    bad: bool,
    started: bool,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter {
            depth: 0,
            in_str: false,
            esc: false,
            want_key: false,
            reading_key: false,
            key: Vec::new(),
            capture: Capture::None,
            buf: Vec::new(),
            items: VecDeque::new(),
            meta: None,
            bad: false,
            started: false,
        }
    }
}

impl Splitter {
    /// Scans `chunk`, queueing every item it completes.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut start = 0; // where the capture's part of this chunk begins
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if self.in_str {
                if self.esc {
                    self.esc = false;
                    if self.reading_key {
                        self.key.push(b);
                    }
                    i += 1;
                    continue;
                }
                // Skip to the next quote or backslash at once.
                match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                    None => {
                        if self.reading_key {
                            self.key.extend_from_slice(&chunk[i..]);
                        }
                        i = chunk.len();
                    }
                    Some(off) => {
                        if self.reading_key {
                            self.key.extend_from_slice(&chunk[i..i + off]);
                        }
                        i += off;
                        if chunk[i] == b'\\' {
                            self.esc = true;
                        } else {
                            self.in_str = false;
                            self.reading_key = false;
                        }
                        i += 1;
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    if self.depth == 1 && self.want_key {
                        self.reading_key = true;
                        self.key.clear();
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 && (self.started || b != b'{') {
                        self.bad = true;
                    }
                    self.started = true;
                    if self.capture == Capture::None {
                        if self.depth == 1 && self.key == b"metadata" {
                            self.capture = Capture::Meta;
                            start = i;
                        } else if self.depth == 2 && self.key == b"items" {
                            self.capture = Capture::Item;
                            start = i;
                        }
                    }
                    self.depth += 1;
                    if self.depth == 1 {
                        self.want_key = true;
                    }
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        self.bad = true;
                    } else {
                        self.depth -= 1;
                    }
                    let done = match self.capture {
                        Capture::Meta => self.depth == 1,
                        Capture::Item => self.depth == 2,
                        Capture::None => false,
                    };
                    if done {
                        self.buf.extend_from_slice(&chunk[start..=i]);
                        let piece = std::mem::take(&mut self.buf);
                        if self.capture == Capture::Meta {
                            self.meta = Some(piece);
                        } else {
                            self.items.push_back(piece);
                        }
                        self.capture = Capture::None;
                    }
                }
                b':' if self.depth == 1 => self.want_key = false,
                b',' if self.depth == 1 => self.want_key = true,
                _ => {}
            }
            i += 1;
        }
        if self.capture != Capture::None {
            self.buf.extend_from_slice(&chunk[start..]);
        }
    }

    /// After the last chunk: whether the bytes were one whole object.
    pub fn complete(&self) -> bool {
        self.started && self.depth == 0 && !self.in_str && !self.bad
    }
}

/// One list request's response, read item by item.
pub struct ListReader<K> {
    body: Pin<Box<dyn AsyncBufRead + Send>>,
    split: Splitter,
    /// Items that did not decode: how many, and the first one's error.
    pub skipped: usize,
    pub first_error: Option<String>,
    done: bool,
    _kind: std::marker::PhantomData<fn() -> K>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMetaLite {
    #[serde(default)]
    resource_version: Option<String>,
}

/// Sends `api`'s list request with `params`; the answer is read by [`ListReader::next`].
pub async fn start<K>(api: &Api<K>, params: &ListParams) -> kube::Result<ListReader<K>>
where
    K: Resource + Clone + DeserializeOwned,
{
    let mut req = kube::core::Request::new(api.resource_url())
        .list(params)
        .map_err(kube::Error::BuildRequest)?;
    req.extensions_mut().insert("list");
    let client: kube::Client = api.clone().into_client();
    let body = client.request_stream(req).await?;
    Ok(ListReader {
        body: Box::pin(body),
        split: Splitter::default(),
        skipped: 0,
        first_error: None,
        done: false,
        _kind: std::marker::PhantomData,
    })
}

/// What [`ListReader::next`] found.
pub enum Read<K> {
    Item(K),
    /// The list is complete: its resourceVersion (None or empty: not given).
    End(Option<String>),
}

impl<K: DeserializeOwned> ListReader<K> {
    /// The next item, or the end of the list with its resourceVersion.
    pub async fn next(&mut self) -> kube::Result<Read<K>> {
        loop {
            while let Some(raw) = self.split.items.pop_front() {
                match serde_json::from_slice::<K>(&raw) {
                    Ok(k) => return Ok(Read::Item(k)),
                    Err(e) => {
                        self.skipped += 1;
                        self.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            if self.done {
                return self.end();
            }
            let chunk = self
                .body
                .fill_buf()
                .await
                .map_err(kube::Error::ReadEvents)?;
            if chunk.is_empty() {
                self.done = true;
                continue;
            }
            let n = chunk.len();
            self.split.feed(chunk);
            self.body.consume_unpin(n);
        }
    }

    fn end(&mut self) -> kube::Result<Read<K>> {
        let truncated = || {
            kube::Error::ReadEvents(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the list response ended before its last object",
            ))
        };
        if !self.split.complete() {
            return Err(truncated());
        }
        let rv = match self.split.meta.take() {
            Some(m) => {
                serde_json::from_slice::<ListMetaLite>(&m)
                    .map_err(kube::Error::SerdeError)?
                    .resource_version
            }
            None => None,
        };
        Ok(Read::End(rv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `text` fed in pieces of `step` bytes.
    fn split(text: &str, step: usize) -> Splitter {
        let mut s = Splitter::default();
        for c in text.as_bytes().chunks(step) {
            s.feed(c);
        }
        s
    }

    fn items(s: &Splitter) -> Vec<serde_json::Value> {
        s.items
            .iter()
            .map(|i| serde_json::from_slice(i).unwrap())
            .collect()
    }

    #[test]
    fn items_and_metadata_at_every_chunk_boundary() {
        // Keys and strings with the characters that matter to the scanner.
        let text = r#" {"kind":"NodeList","apiVersion":"v1","metadata":{"resourceVersion":"42","x":{"items":[1]}},
            "items":[{"metadata":{"name":"a\"}{","labels":{"k":"]["}},"spec":{"items":[{"n":1}]}},
                     {"metadata":{"name":"b\\"},"note":"\u00e9 items"} ] } "#;
        let want = [
            serde_json::json!({"metadata":{"name":"a\"}{","labels":{"k":"]["}},"spec":{"items":[{"n":1}]}}),
            serde_json::json!({"metadata":{"name":"b\\"},"note":"\u{e9} items"}),
        ];
        for step in 1..=text.len() {
            let s = split(text, step);
            assert!(s.complete(), "step {step}");
            assert_eq!(items(&s), want, "step {step}");
            let meta: serde_json::Value = serde_json::from_slice(s.meta.as_ref().unwrap()).unwrap();
            assert_eq!(meta["resourceVersion"], "42", "step {step}");
        }
    }

    #[test]
    fn keys_named_like_ours_elsewhere_are_not_taken() {
        // "items" as a value and inside metadata; items before metadata.
        let text = r#"{"kind":"items","items":[{"a":1}],"metadata":{"resourceVersion":"7"},"extra":{"items":[{"b":2}]}}"#;
        let s = split(text, 5);
        assert!(s.complete());
        assert_eq!(items(&s), [serde_json::json!({"a":1})]);
        assert!(s.meta.is_some());
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Named {
        name: String,
    }

    fn reader(body: &'static str) -> ListReader<Named> {
        ListReader {
            body: Box::pin(futures::io::Cursor::new(body.as_bytes())),
            split: Splitter::default(),
            skipped: 0,
            first_error: None,
            done: false,
            _kind: std::marker::PhantomData,
        }
    }

    async fn read_all(r: &mut ListReader<Named>) -> kube::Result<(Vec<String>, Option<String>)> {
        let mut names = Vec::new();
        loop {
            match r.next().await? {
                Read::Item(n) => names.push(n.name),
                Read::End(rv) => return Ok((names, rv)),
            }
        }
    }

    #[tokio::test]
    async fn one_undecodable_item_is_left_out_and_counted() {
        let mut r = reader(
            r#"{"metadata":{"resourceVersion":"9"},"items":[{"name":"a"},{"name":5},{"name":"c"}]}"#,
        );
        let (names, rv) = read_all(&mut r).await.unwrap();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(rv.as_deref(), Some("9"));
        assert_eq!(r.skipped, 1);
        assert!(r.first_error.as_deref().unwrap().contains("invalid type"));
    }

    #[tokio::test]
    async fn a_cut_off_response_is_an_error_not_a_short_list() {
        let mut r = reader(r#"{"metadata":{"resourceVersion":"9"},"items":[{"name":"a"},{"na"#);
        assert!(read_all(&mut r).await.is_err());
    }

    #[test]
    fn truncated_or_malformed_is_not_complete() {
        let text = r#"{"metadata":{"resourceVersion":"7"},"items":[{"a":1},{"b":"#;
        let s = split(text, 7);
        assert!(!s.complete());
        assert_eq!(items(&s), [serde_json::json!({"a":1})]);
        assert!(!split(r#"{"items":[]}}"#, 3).complete());
        assert!(!split(r#"{"items":[]}{}"#, 3).complete());
        assert!(!split(r#"[{"a":1}]"#, 3).complete());
        assert!(!split("", 1).complete());
        let empty = split(r#"{"metadata":{},"items":[]}"#, 2);
        assert!(empty.complete() && empty.items.is_empty());
        let null = split(r#"{"metadata":{},"items":null}"#, 2);
        assert!(null.complete() && null.items.is_empty());
    }
}
