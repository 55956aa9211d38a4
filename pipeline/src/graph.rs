//! The stage DAG: topological order, cycle detection, downstream sets, text and dot rendering.

use std::collections::BTreeSet;
use std::fmt::Write;

/// Stages as nodes, `inputs[i]` the upstream nodes of node `i`.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    names: Vec<String>,
    kinds: Vec<String>,
    inputs: Vec<Vec<usize>>,
}

impl Graph {
    /// A graph of `(name, kind, inputs)` nodes; input indices must be in range.
    pub fn new(nodes: Vec<(String, String, Vec<usize>)>) -> Self {
        let mut g = Graph::default();
        for (name, kind, inputs) in nodes {
            g.names.push(name);
            g.kinds.push(kind);
            g.inputs.push(inputs);
        }
        g
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Upstream nodes of `i`.
    pub fn inputs(&self, i: usize) -> &[usize] {
        &self.inputs[i]
    }

    /// A topological order (ties keep index order), or the nodes of one cycle, first node
    /// repeated at the end.
    pub fn topo_order(&self) -> Result<Vec<usize>, Vec<usize>> {
        let mut order = Vec::with_capacity(self.len());
        let mut done = vec![false; self.len()];
        while order.len() < self.len() {
            let ready = (0..self.len()).find(|&i| !done[i] && self.inputs[i].iter().all(|&u| done[u]));
            match ready {
                Some(i) => {
                    done[i] = true;
                    order.push(i);
                }
                None => return Err(self.find_cycle(&done)),
            }
        }
        Ok(order)
    }

    /// The nodes that come before any cycle or anything downstream of one, in a topological
    /// order: those whose checks do not depend on a cycle.
    pub fn acyclic_order(&self) -> Vec<usize> {
        let mut order = Vec::new();
        let mut done = vec![false; self.len()];
        while let Some(i) = (0..self.len()).find(|&i| !done[i] && self.inputs[i].iter().all(|&u| done[u])) {
            done[i] = true;
            order.push(i);
        }
        order
    }

    /// Walks upstream from a blocked node until a node repeats.
    fn find_cycle(&self, done: &[bool]) -> Vec<usize> {
        let start = (0..self.len()).find(|&i| !done[i]).unwrap_or(0);
        let mut path = vec![start];
        loop {
            let last = *path.last().unwrap_or(&start);
            let Some(&next) = self.inputs[last].iter().find(|&&u| !done[u]) else { return path };
            if let Some(pos) = path.iter().position(|&n| n == next) {
                let mut cycle: Vec<usize> = path[pos..].to_vec();
                cycle.reverse(); // upstream first: a -> b means b reads a
                let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
                cycle.rotate_left(first);
                cycle.push(cycle[0]);
                return cycle;
            }
            path.push(next);
        }
    }

    /// Renders a cycle as `a -> b -> a`.
    pub fn describe_path(&self, nodes: &[usize]) -> String {
        nodes.iter().map(|&i| self.names[i].as_str()).collect::<Vec<_>>().join(" -> ")
    }

    /// `i` and every node downstream of it.
    pub fn downstream(&self, i: usize) -> BTreeSet<usize> {
        let mut set = BTreeSet::from([i]);
        let mut changed = true;
        while changed {
            changed = false;
            for n in 0..self.len() {
                if !set.contains(&n) && self.inputs[n].iter().any(|u| set.contains(u)) {
                    set.insert(n);
                    changed = true;
                }
            }
        }
        set
    }

    /// One line per stage in topological order: `name (kind) <- inputs`.
    pub fn to_text(&self, order: &[usize]) -> String {
        let mut out = String::new();
        for &i in order {
            let _ = write!(out, "{} ({})", self.names[i], self.kinds[i]);
            if !self.inputs[i].is_empty() {
                let ups: Vec<&str> = self.inputs[i].iter().map(|&u| self.names[u].as_str()).collect();
                let _ = write!(out, " <- {}", ups.join(", "));
            }
            out.push('\n');
        }
        out
    }

    /// Graphviz dot.
    pub fn to_dot(&self, pipeline: &str) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", pipeline.replace('"', "'"));
        for i in 0..self.len() {
            let _ = writeln!(
                out,
                "  \"{}\" [label=\"{}\\n({})\", shape=box];",
                self.names[i], self.names[i], self.kinds[i]
            );
        }
        for i in 0..self.len() {
            for &u in &self.inputs[i] {
                let _ = writeln!(out, "  \"{}\" -> \"{}\";", self.names[u], self.names[i]);
            }
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn graph(edges: &[&[usize]]) -> Graph {
        Graph::new(edges.iter().enumerate().map(|(i, e)| (format!("s{i}"), "k".into(), e.to_vec())).collect())
    }

    #[test]
    fn order_respects_every_edge() {
        let g = graph(&[&[2], &[], &[1], &[0, 1]]);
        let order = g.topo_order().unwrap();
        let pos = |n| order.iter().position(|&x| x == n).unwrap();
        for n in 0..g.len() {
            for &u in g.inputs(n) {
                assert!(pos(u) < pos(n));
            }
        }
    }

    #[test]
    fn cycles_are_reported_as_paths() {
        let g = graph(&[&[], &[2], &[3], &[1]]);
        let cycle = g.topo_order().unwrap_err();
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 4);
        assert_eq!(g.describe_path(&cycle), "s1 -> s3 -> s2 -> s1");
    }

    /// A random DAG: `n` nodes in a shuffled file order, each reading some nodes earlier in a
    /// hidden rank; and one extra edge from a node to one of its own ancestors-to-be.
    fn random_dag() -> impl Strategy<Value = (Vec<Vec<usize>>, (usize, usize))> {
        (2usize..12)
            .prop_flat_map(|n| {
                let edges = proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n);
                (Just(n), edges, Just((0..n).collect::<Vec<_>>()).prop_shuffle(), (0..n, 0..n))
            })
            .prop_map(|(n, coin, file_order, back)| {
                // rank r reads rank q < r when coin[r][q]; node file_order[r] has rank r.
                let mut inputs = vec![Vec::new(); n];
                for r in 0..n {
                    for q in 0..r {
                        if coin[r][q] {
                            inputs[file_order[r]].push(file_order[q]);
                        }
                    }
                }
                // A back edge: the lower-ranked end reads the higher-ranked one (or itself).
                let (a, b) = (back.0.min(back.1), back.0.max(back.1));
                (inputs, (file_order[a], file_order[b]))
            })
    }

    proptest! {
        #[test]
        fn random_dags_run_in_an_order_that_respects_every_edge((inputs, _) in random_dag()) {
            let g = Graph::new(inputs.iter().enumerate().map(|(i, e)| (format!("s{i}"), "k".into(), e.clone())).collect());
            let order = g.topo_order().expect("a DAG has an order");
            prop_assert_eq!(order.len(), g.len());
            let pos = |n| order.iter().position(|&x| x == n).unwrap();
            for n in 0..g.len() {
                for &u in g.inputs(n) {
                    prop_assert!(pos(u) < pos(n), "s{} runs before its input s{}", n, u);
                }
            }
        }

        #[test]
        fn a_back_edge_is_reported_as_a_cycle_through_it((mut inputs, (low, high)) in random_dag()) {
            // `low` now also reads `high`, which (through a chain of inputs) reads `low` or is it.
            let chain = path_exists(&inputs, high, low);
            inputs[low].push(high);
            let g = Graph::new(inputs.iter().enumerate().map(|(i, e)| (format!("s{i}"), "k".into(), e.clone())).collect());
            match g.topo_order() {
                Ok(_) => prop_assert!(!chain, "a cycle through s{} and s{} went unreported", low, high),
                Err(cycle) => {
                    prop_assert!(chain, "a cycle was reported where there is none: {:?}", cycle);
                    prop_assert_eq!(cycle.first(), cycle.last());
                    for w in cycle.windows(2) {
                        prop_assert!(g.inputs(w[1]).contains(&w[0]), "{} does not read {}", w[1], w[0]);
                    }
                }
            }
        }
    }

    /// Whether `from` reads `to`, directly or not (or is it).
    fn path_exists(inputs: &[Vec<usize>], from: usize, to: usize) -> bool {
        let mut seen = vec![false; inputs.len()];
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            if n == to {
                return true;
            }
            if !std::mem::replace(&mut seen[n], true) {
                stack.extend(&inputs[n]);
            }
        }
        false
    }

    #[test]
    fn downstream_is_transitive() {
        let g = graph(&[&[], &[0], &[1], &[]]);
        assert_eq!(g.downstream(0), BTreeSet::from([0, 1, 2]));
    }
}
