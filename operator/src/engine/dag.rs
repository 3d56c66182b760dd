//! Dependency-graph analysis: which tasks lie on a `dependsOn` cycle, and a cycle path to show
//! the user for each of them.
//!
//! Everything is iterative so graphs of 100k tasks cannot overflow the stack, and runs in
//! O(V + E + V * MAX_CYCLE_REPORT).

use std::collections::{BTreeMap, VecDeque};

/// Longest cycle path reported in full; longer ones keep their ends around [`ELISION`].
pub const MAX_CYCLE_REPORT: usize = 32;
/// Marker standing for the elided middle of a long cycle path.
pub const ELISION: &str = "...";

/// For every task on a dependency cycle (a strongly connected component with more than one
/// task, or a task that depends on itself), a cycle path through it that starts and ends with
/// it, e.g. `["a", "b", "c", "a"]`. Edges to names that are not keys of `graph` are ignored.
///
/// Paths up to [`MAX_CYCLE_REPORT`] tasks are simple cycles; longer ones show their first and
/// last tasks with an [`ELISION`] element in between, which keeps the output (and any status
/// message built from it) small for huge cycles.
pub fn find_cycles(graph: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let names: Vec<&str> = graph.keys().map(String::as_str).collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> = graph
        .values()
        .map(|deps| {
            deps.iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();

    let mut out = BTreeMap::new();
    for scc in strongly_connected(&adj) {
        let cyclic = scc.len() > 1 || scc.first().is_some_and(|&v| adj[v].contains(&v));
        if !cyclic {
            continue;
        }
        for (v, path) in cycle_paths(&adj, &scc) {
            out.insert(
                names[v].to_string(),
                path.into_iter()
                    .map(|p| p.map_or(ELISION, |i| names[i]).to_string())
                    .collect(),
            );
        }
    }
    out
}

/// Tarjan's algorithm with an explicit stack.
fn strongly_connected(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = adj.len();
    let mut order = vec![UNSEEN; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut sccs = Vec::new();
    let mut counter = 0;
    // (node, index of the next edge to look at)
    let mut call: Vec<(usize, usize)> = Vec::new();

    for root in 0..n {
        if order[root] != UNSEEN {
            continue;
        }
        call.push((root, 0));
        order[root] = counter;
        low[root] = counter;
        counter += 1;
        stack.push(root);
        on_stack[root] = true;

        while let Some(frame) = call.last_mut() {
            let (v, next) = *frame;
            if let Some(&w) = adj[v].get(next) {
                frame.1 += 1;
                if order[w] == UNSEEN {
                    order[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(order[w]);
                }
                continue;
            }
            call.pop();
            if let Some(&(parent, _)) = call.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == order[v] {
                let mut scc = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                sccs.push(scc);
            }
        }
    }
    sccs
}

/// Breadth-first parents within the component, from `root`, following `edges`.
fn bfs(edges: &[Vec<usize>], member: &[bool], root: usize, dist: &mut [usize], parent: &mut [usize]) {
    let mut queue = VecDeque::from([root]);
    dist[root] = 0;
    while let Some(v) = queue.pop_front() {
        for &w in &edges[v] {
            if member[w] && dist[w] == usize::MAX {
                dist[w] = dist[v] + 1;
                parent[w] = v;
                queue.push_back(w);
            }
        }
    }
}

/// A cycle path through every node of one cyclic component: `v -> ... -> root -> ... -> v`,
/// built from a forward and a backward BFS tree rooted at the component's first node. `None`
/// elements stand for an elided middle.
fn cycle_paths(adj: &[Vec<usize>], scc: &[usize]) -> Vec<(usize, Vec<Option<usize>>)> {
    let n = adj.len();
    let mut member = vec![false; n];
    for &v in scc {
        member[v] = true;
    }
    let mut reverse: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &v in scc {
        for &w in &adj[v] {
            if member[w] {
                reverse[w].push(v);
            }
        }
    }
    let root = scc.iter().copied().min().unwrap_or(0);
    let (mut fdist, mut fparent) = (vec![usize::MAX; n], vec![usize::MAX; n]);
    let (mut bdist, mut bparent) = (vec![usize::MAX; n], vec![usize::MAX; n]);
    // fparent[w] = predecessor of w on a shortest root -> w path.
    bfs(adj, &member, root, &mut fdist, &mut fparent);
    // bparent[w] = successor of w on a shortest w -> root path.
    bfs(&reverse, &member, root, &mut bdist, &mut bparent);

    let mut out = Vec::with_capacity(scc.len());
    for &v in scc {
        if v == root {
            // Shortest cycle through the root: root -> ... -> p -> root over a predecessor p.
            let p = reverse[root]
                .iter()
                .copied()
                .min_by_key(|&p| fdist[p])
                .unwrap_or(root);
            let mut back = Vec::new();
            let mut w = p;
            while w != root {
                back.push(w);
                w = fparent[w];
            }
            let mut walk = vec![root];
            walk.extend(back.into_iter().rev());
            walk.push(root);
            out.push((v, elide(walk)));
            continue;
        }
        let full = bdist[v].saturating_add(fdist[v]).saturating_add(1);
        if full <= MAX_CYCLE_REPORT {
            let mut walk = vec![v];
            let mut w = v;
            while w != root {
                w = bparent[w];
                walk.push(w);
            }
            let mut back = Vec::new();
            let mut w = v;
            while w != root {
                w = fparent[w];
                back.push(w);
            }
            // back = [pred(v), ..., root]; the walk continues root -> ... -> v.
            back.pop();
            walk.extend(back.into_iter().rev());
            walk.push(v);
            out.push((v, simplify(walk).into_iter().map(Some).collect()));
        } else {
            // Only the ends are shown, so only walk that far from v in each direction.
            let half = MAX_CYCLE_REPORT / 2;
            let mut path = vec![Some(v)];
            let mut w = v;
            while w != root && path.len() < half {
                w = bparent[w];
                path.push(Some(w));
            }
            path.push(None);
            let mut tail = Vec::new();
            let mut w = v;
            while w != root && tail.len() < MAX_CYCLE_REPORT - half - 2 {
                w = fparent[w];
                tail.push(Some(w));
            }
            path.extend(tail.into_iter().rev());
            path.push(Some(v));
            out.push((v, path));
        }
    }
    out
}

/// Keeps the two ends of a path longer than [`MAX_CYCLE_REPORT`] around a `None` marker.
fn elide(walk: Vec<usize>) -> Vec<Option<usize>> {
    if walk.len() <= MAX_CYCLE_REPORT {
        return walk.into_iter().map(Some).collect();
    }
    let half = MAX_CYCLE_REPORT / 2;
    let tail = MAX_CYCLE_REPORT - half - 1;
    let mut out: Vec<Option<usize>> = walk[..half].iter().map(|&w| Some(w)).collect();
    out.push(None);
    out.extend(walk[walk.len() - tail..].iter().map(|&w| Some(w)));
    out
}

/// Removes inner loops from a closed walk `[v, ..., v]`, leaving a simple cycle through `v`.
fn simplify(walk: Vec<usize>) -> Vec<usize> {
    let Some((&last, inner)) = walk.split_last() else {
        return walk;
    };
    let mut path: Vec<usize> = Vec::with_capacity(walk.len());
    let mut pos: BTreeMap<usize, usize> = BTreeMap::new();
    for &w in inner {
        if let Some(&i) = pos.get(&w) {
            for removed in path.drain(i + 1..) {
                pos.remove(&removed);
            }
        } else {
            pos.insert(w, path.len());
            path.push(w);
        }
    }
    path.push(last);
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    /// A path is a valid cycle if it starts and ends with `node` and follows edges.
    fn assert_cycle(g: &BTreeMap<String, Vec<String>>, node: &str, path: &[String]) {
        assert_eq!(path.first().map(String::as_str), Some(node), "{path:?}");
        assert_eq!(path.last().map(String::as_str), Some(node), "{path:?}");
        for pair in path.windows(2) {
            if pair[0] == ELISION || pair[1] == ELISION {
                continue;
            }
            assert!(
                g[&pair[0]].contains(&pair[1]),
                "no edge {} -> {}: {path:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn acyclic_graph_has_no_cycles() {
        let g = graph(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[]), ("d", &["missing"])]);
        assert!(find_cycles(&g).is_empty());
    }

    #[test]
    fn reports_cycle_paths() {
        let g = graph(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &["a"]),
            ("e", &["e"]),
        ]);
        let c = find_cycles(&g);
        assert_eq!(c.keys().collect::<Vec<_>>(), vec!["a", "b", "c", "e"]);
        assert_eq!(c["a"], vec!["a", "b", "c", "a"]);
        assert_eq!(c["b"], vec!["b", "c", "a", "b"]);
        assert_eq!(c["c"], vec!["c", "a", "b", "c"]);
        assert_eq!(c["e"], vec!["e", "e"]);
    }

    #[test]
    fn two_cycles_in_one_component_give_simple_paths() {
        let g = graph(&[("a", &["b", "c"]), ("b", &["a"]), ("c", &["a"])]);
        let c = find_cycles(&g);
        assert_eq!(c["b"], vec!["b", "a", "b"]);
        assert_eq!(c["c"], vec!["c", "a", "c"]);
        for (n, p) in &c {
            assert_cycle(&g, n, p);
        }
    }

    #[test]
    fn huge_chain_and_ring_do_not_overflow() {
        let n = 100_000;
        let name = |i: usize| format!("t{i:06}");
        let chain: BTreeMap<String, Vec<String>> = (0..n)
            .map(|i| (name(i), if i > 0 { vec![name(i - 1)] } else { vec![] }))
            .collect();
        assert!(find_cycles(&chain).is_empty());
        let ring: BTreeMap<String, Vec<String>> =
            (0..n).map(|i| (name(i), vec![name((i + 1) % n)])).collect();
        let c = find_cycles(&ring);
        assert_eq!(c.len(), n);
        for (node, path) in c.iter().step_by(997) {
            assert!(path.len() <= MAX_CYCLE_REPORT + 2, "{}", path.len());
            assert!(path.iter().any(|p| p == ELISION));
            assert_cycle(&ring, node, path);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn dag_has_no_cycles_and_back_edge_makes_cycle(
            n in 2usize..40,
            edges in proptest::collection::vec((0usize..40, 0usize..40), 0..120),
            back in (0usize..40, 0usize..40),
        ) {
            let name = |i: usize| format!("n{i}");
            let mut g: BTreeMap<String, Vec<String>> = (0..n).map(|i| (name(i), vec![])).collect();
            for (a, b) in edges {
                let (a, b) = (a % n, b % n);
                if b < a {
                    g.entry(name(a)).or_default().push(name(b));
                }
            }
            prop_assert!(find_cycles(&g).is_empty());

            // Back edge from an earlier node to a later one that reaches it; use the chain
            // lo <- lo+1 <- ... <- hi so a path hi -> ... -> lo exists, then add lo -> hi.
            let (lo, hi) = (back.0 % n, back.1 % n);
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            for i in lo + 1..=hi {
                g.entry(name(i)).or_default().push(name(i - 1));
            }
            g.entry(name(lo)).or_default().push(name(hi));
            let c = find_cycles(&g);
            for i in lo..=hi {
                prop_assert!(c.contains_key(&name(i)), "{} not cyclic", name(i));
            }
            for (node, path) in &c {
                assert_cycle(&g, node, path);
            }
        }
    }
}
