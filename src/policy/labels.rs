//! Labels as policy keeps them for every pod of the cluster: a sorted slice
//! of shared strings. The same keys and values (`app`, `pod-template-hash`,
//! a Deployment's name) recur on thousands of pods; an [`Interner`] gives
//! each text one allocation, so a pod's labels cost a slice of pointers
//! (16 bytes a pair) instead of a B-tree node and two owned strings per pair
//! (~600 bytes for a typical pod).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// A shared, immutable string.
pub type Sym = Arc<str>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Sym, Sym)]>);

impl Labels {
    /// From a decoded label map (already sorted by key), sharing texts via `i`.
    pub fn interned(map: &BTreeMap<String, String>, i: &mut Interner) -> Labels {
        Labels(map.iter().map(|(k, v)| (i.get(k), i.get(v))).collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|n| &*self.0[n].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Unshared (for namespaces, a few dozen, and tests); a repeated key keeps its last value.
impl FromIterator<(String, String)> for Labels {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(it: T) -> Labels {
        let map: BTreeMap<String, String> = it.into_iter().collect();
        Labels(
            map.into_iter()
                .map(|(k, v)| (Sym::from(k), Sym::from(v)))
                .collect(),
        )
    }
}

/// One allocation per distinct text. Texts nobody holds any more are
/// dropped whenever the table has doubled since the last sweep, so label
/// values that churn (each rollout's `pod-template-hash`) do not pile up.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<Sym>,
    live: usize,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Sym {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.live + 1024 {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.live = self.set.len();
        }
        let a: Sym = Sym::from(s);
        self.set.insert(a.clone());
        a
    }

    /// Distinct texts held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_sharing() {
        let mut i = Interner::default();
        let m: BTreeMap<String, String> = [("tier", "front"), ("app", "web"), ("z", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = Labels::interned(&m, &mut i);
        let b = Labels::interned(&m, &mut i);
        assert_eq!(a.get("app"), Some("web"));
        assert_eq!(a.get("tier"), Some("front"));
        assert_eq!(a.get("z"), Some(""));
        assert_eq!(a.get("ap"), None);
        assert_eq!(a.len(), 3);
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&a.0[0].1, &b.0[0].1), "one allocation per text");
        assert_eq!(i.len(), 6);
        let c: Labels = m.clone().into_iter().collect();
        assert_eq!(a, c, "equal whether shared or not");
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("app", "web"), ("tier", "front"), ("z", "")]
        );
    }

    #[test]
    fn texts_nobody_holds_are_swept() {
        let mut i = Interner::default();
        let kept = i.get("kept");
        for n in 0..100_000 {
            // Each dropped at once, as a churned label value is.
            drop(i.get(&format!("hash-{n}")));
        }
        assert!(i.len() < 3000, "{} texts held", i.len());
        assert!(Arc::ptr_eq(&kept, &i.get("kept")));
    }
}
