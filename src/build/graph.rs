//! The worker's memory of the reference graph: store paths interned as dense ids with their
//! references, loaded from the database once per path, extended as builds register outputs.
//! It answers closures and "which known paths does this output mention, and are they in the
//! inputs' closure" without building a candidate set per build. It does not know goals.

use std::collections::{HashMap, HashSet};

use crate::store::local::{LocalStore, StoreError};
use crate::store::refs::Candidates;
use crate::store::StorePath;

#[derive(Debug)]
struct Node {
    path: StorePath,
    refs: Box<[u32]>,
    /// References known (from the database or a registration).
    loaded: bool,
}

#[derive(Debug, Default)]
pub struct PathGraph {
    nodes: Vec<Node>,
    index: HashMap<StorePath, u32>,
    by_hash: HashMap<[u8; 32], u32>,
    /// What `closure` has seen, by id: the walk's stamp (no set to hash into per walk).
    seen: std::cell::RefCell<(Vec<u32>, u32)>,
}

fn hash_key(p: &StorePath) -> [u8; 32] {
    let mut k = [0u8; 32];
    k.copy_from_slice(&p.hash_part().as_bytes()[..32]);
    k
}

impl PathGraph {
    pub fn path(&self, id: u32) -> &StorePath {
        &self.nodes[id as usize].path
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn id(&self, p: &StorePath) -> Option<u32> {
        self.index.get(p).copied()
    }

    /// The known path with this hash part.
    pub fn id_by_hash_part(&self, h: &str) -> Option<u32> {
        let b = h.as_bytes();
        if b.len() != 32 {
            return None;
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(b);
        self.by_hash.get(&k).copied()
    }

    /// The id of `p`, interning it (references unknown yet).
    pub fn intern(&mut self, p: &StorePath) -> u32 {
        if let Some(&i) = self.index.get(p) {
            return i;
        }
        let i = self.nodes.len() as u32;
        self.nodes.push(Node {
            path: p.clone(),
            refs: Box::new([]),
            loaded: false,
        });
        self.index.insert(p.clone(), i);
        self.by_hash.insert(hash_key(p), i);
        i
    }

    /// Makes `p` and its whole closure known, reading what is missing from the database.
    pub fn load(&mut self, store: &LocalStore, p: &StorePath) -> Result<u32, StoreError> {
        let root = self.intern(p);
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if self.nodes[id as usize].loaded {
                continue;
            }
            let info = store.require_info(&self.nodes[id as usize].path)?;
            let refs: Box<[u32]> = info.references.iter().map(|r| self.intern(r)).collect();
            stack.extend(refs.iter().copied());
            let n = &mut self.nodes[id as usize];
            n.refs = refs;
            n.loaded = true;
        }
        Ok(root)
    }

    /// Records a freshly registered path and its references (which must be known).
    pub fn add_registered(&mut self, p: &StorePath, refs: &[StorePath]) -> u32 {
        let id = self.intern(p);
        let refs: Box<[u32]> = refs.iter().map(|r| self.intern(r)).collect();
        let n = &mut self.nodes[id as usize];
        n.refs = refs;
        n.loaded = true;
        id
    }

    /// The closure of `roots`, in discovery order.
    pub fn closure(&self, roots: &[u32]) -> Vec<u32> {
        self.closure_beyond(Vec::new(), roots)
    }

    /// `known`, a closure, extended to the closure of `roots` too (each path once).
    pub fn closure_beyond(&self, known: Vec<u32>, roots: &[u32]) -> Vec<u32> {
        let mut seen = self.seen.borrow_mut();
        let (marks, stamp) = &mut *seen;
        *stamp = stamp.wrapping_add(1);
        if *stamp == 0 {
            marks.iter_mut().for_each(|m| *m = 0);
            *stamp = 1;
        }
        marks.resize(self.nodes.len(), 0);
        for &id in &known {
            marks[id as usize] = *stamp;
        }
        let mut out = known;
        let mut stack: Vec<u32> = roots.to_vec();
        while let Some(id) = stack.pop() {
            let m = &mut marks[id as usize];
            if *m != *stamp {
                *m = *stamp;
                out.push(id);
                stack.extend(self.nodes[id as usize].refs.iter().copied());
            }
        }
        out
    }

    /// Which of `targets` lie in the closure of `roots`; stops as soon as all are found,
    /// so outputs that mention only their direct inputs cost next to nothing.
    pub fn reachable(&self, roots: &[u32], targets: &HashSet<u32>) -> HashSet<u32> {
        let mut found = HashSet::new();
        if targets.is_empty() {
            return found;
        }
        let mut seen: HashSet<u32> = HashSet::new();
        let mut queue: std::collections::VecDeque<u32> = roots.iter().copied().collect();
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id) {
                continue;
            }
            if targets.contains(&id) {
                found.insert(id);
                if found.len() == targets.len() {
                    break;
                }
            }
            queue.extend(self.nodes[id as usize].refs.iter().copied());
        }
        found
    }

    /// A reference-scan candidate lookup over every known path.
    pub fn candidates(&self) -> KnownHashes<'_> {
        KnownHashes {
            graph: self,
            found: HashSet::new(),
        }
    }
}

/// Candidates for [`crate::store::refs::RefScanSink`]: any path the graph knows.
pub struct KnownHashes<'a> {
    graph: &'a PathGraph,
    pub found: HashSet<u32>,
}

impl Candidates for KnownHashes<'_> {
    fn is_exhausted(&self) -> bool {
        false
    }

    fn take(&mut self, window: &[u8]) -> bool {
        let mut k = [0u8; 32];
        k.copy_from_slice(window);
        match self.graph.by_hash.get(&k) {
            Some(&id) => self.found.insert(id),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(h: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", h.to_string().repeat(32))).unwrap()
    }

    #[test]
    fn closure_and_reachability() {
        let mut g = PathGraph::default();
        let a = g.add_registered(&sp('a', "a"), &[]);
        let b = g.add_registered(&sp('b', "b"), &[sp('a', "a")]);
        let c = g.add_registered(&sp('c', "c"), &[sp('b', "b")]);
        let d = g.add_registered(&sp('d', "d"), &[]);
        let mut cl = g.closure(&[c]);
        cl.sort();
        assert_eq!(cl, vec![a, b, c]);
        // Each walk starts afresh (the marks of the last one do not hide paths), also
        // after paths were added.
        assert_eq!(g.closure(&[b, a]).len(), 2);
        let e = g.add_registered(&sp('g', "e"), &[sp('c', "c"), sp('d', "d")]);
        let mut cl = g.closure(&[e]);
        cl.sort();
        assert_eq!(cl, vec![a, b, c, d, e]);
        assert_eq!(g.closure(&[d]), vec![d]);
        // A known closure extended by more roots: each path once.
        let mut cl = g.closure_beyond(g.closure(&[b]), &[e]);
        cl.sort();
        assert_eq!(cl, vec![a, b, c, d, e]);
        assert_eq!(g.closure_beyond(g.closure(&[c]), &[a]).len(), 3);
        let t: HashSet<u32> = [a, d].into_iter().collect();
        assert_eq!(g.reachable(&[c], &t), [a].into_iter().collect());
        let mut k = g.candidates();
        assert!(k.take(sp('d', "x").hash_part().as_bytes()));
        assert!(!k.take(sp('d', "x").hash_part().as_bytes()));
        assert!(!k.take(sp('f', "x").hash_part().as_bytes()));
    }
}
