//! A linearizability checker for single-key histories: Wing & Gong's search with Lowe's
//! memoisation (the algorithm of porcupine and knossos' `wgl`), written here for a small
//! register model. Operations whose outcome is unknown (the caller saw an error or a
//! timeout) may take effect at any point after their invocation, or never.

use std::collections::HashSet;
use std::fmt;

/// A sequential model: a state and the operations on it.
pub trait Model {
    /// The state.
    type State: Clone + Eq + std::hash::Hash + fmt::Debug;
    /// An operation with its input and (observed) output.
    type Op: fmt::Debug;
    /// Applies `op` to `state`: `Some(next)` if the observed output is what the model
    /// answers in `state`, `None` otherwise. `known` is false for an operation whose
    /// output was not observed (anything goes).
    fn step(state: &Self::State, op: &Self::Op, known: bool) -> Option<Self::State>;
}

/// One operation of a history: invoked at `call`, answered at `ret` (`None`: no answer
/// observed; it may have taken effect at any time after `call`, or not at all).
#[derive(Debug, Clone)]
pub struct Entry<O> {
    /// Invocation time (any monotonic unit).
    pub call: u64,
    /// Answer time.
    pub ret: Option<u64>,
    /// The operation and what it returned.
    pub op: O,
}

#[derive(Clone, Copy)]
struct Node {
    /// Index of the operation.
    op: usize,
    /// A call (true) or a return (false).
    is_call: bool,
    /// For a call, the node of its return (if any).
    partner: Option<usize>,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Whether `history`, started in `init`, is linearizable. Gives up (returns `None`) after
/// `budget` search steps.
pub fn check<M: Model>(init: M::State, history: &[Entry<M::Op>], budget: u64) -> Option<bool> {
    let n = history.len();
    if n == 0 {
        return Some(true);
    }
    // Events sorted by time, calls before returns at equal times: operations that touch
    // at one instant count as concurrent (the weaker, safe reading; it also keeps an
    // operation answered at the instant it was invoked after its own call).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in history.iter().enumerate() {
        events.push((e.call, true, i));
        if let Some(r) = e.ret {
            events.push((r.max(e.call), false, i));
        }
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    let mut nodes: Vec<Node> = events
        .iter()
        .map(|&(_, is_call, op)| Node {
            op,
            is_call,
            partner: None,
            prev: None,
            next: None,
        })
        .collect();
    let mut ret_node = vec![None; n];
    for (k, node) in nodes.iter().enumerate() {
        if !node.is_call {
            ret_node[node.op] = Some(k);
        }
    }
    for k in 0..nodes.len() {
        nodes[k].prev = k.checked_sub(1);
        nodes[k].next = (k + 1 < nodes.len()).then_some(k + 1);
        if nodes[k].is_call {
            nodes[k].partner = ret_node[nodes[k].op];
        }
    }
    // A sentinel head at index `len`.
    let head = nodes.len();
    nodes.push(Node {
        op: usize::MAX,
        is_call: false,
        partner: None,
        prev: None,
        next: Some(0),
    });
    nodes[0].prev = Some(head);

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = init;
    let mut cur = nodes[head].next;
    let mut steps = 0u64;

    let lift = |nodes: &mut Vec<Node>, k: usize| {
        let unlink = |nodes: &mut Vec<Node>, k: usize| {
            let (p, nx) = (nodes[k].prev, nodes[k].next);
            if let Some(p) = p {
                nodes[p].next = nx;
            }
            if let Some(nx) = nx {
                nodes[nx].prev = p;
            }
        };
        unlink(nodes, k);
        if let Some(r) = nodes[k].partner {
            unlink(nodes, r);
        }
    };
    let unlift = |nodes: &mut Vec<Node>, k: usize| {
        let relink = |nodes: &mut Vec<Node>, k: usize| {
            let (p, nx) = (nodes[k].prev, nodes[k].next);
            if let Some(p) = p {
                nodes[p].next = Some(k);
            }
            if let Some(nx) = nx {
                nodes[nx].prev = Some(k);
            }
        };
        if let Some(r) = nodes[k].partner {
            relink(nodes, r);
        }
        relink(nodes, k);
    };

    loop {
        steps += 1;
        if steps > budget {
            return None;
        }
        // Done when no return remains: what is left are calls without answers.
        let mut any_return = false;
        let mut k = nodes[head].next;
        while let Some(i) = k {
            if !nodes[i].is_call {
                any_return = true;
                break;
            }
            k = nodes[i].next;
        }
        if !any_return {
            return Some(true);
        }
        let Some(c) = cur else {
            // Walked past the end without meeting a return: cannot happen while one remains.
            return Some(false);
        };
        if nodes[c].is_call {
            let op = nodes[c].op;
            let known = history[op].ret.is_some();
            if let Some(next) = M::step(&state, &history[op].op, known) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), next.clone())) {
                    stack.push((c, state));
                    state = next;
                    lift(&mut nodes, c);
                    cur = nodes[head].next;
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            cur = nodes[c].next;
        } else {
            // A return whose call was not linearized: backtrack.
            let Some((c, prev_state)) = stack.pop() else {
                return Some(false);
            };
            let op = nodes[c].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            unlift(&mut nodes, c);
            cur = nodes[c].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of `Option<i64>`: write(v) or read() -> v.
    struct Reg;
    #[derive(Debug)]
    enum Op {
        W(i64),
        R(Option<i64>),
    }
    impl Model for Reg {
        type State = Option<i64>;
        type Op = Op;
        fn step(s: &Option<i64>, op: &Op, known: bool) -> Option<Option<i64>> {
            match op {
                Op::W(v) => Some(Some(*v)),
                Op::R(r) => (!known || r == s).then_some(*s),
            }
        }
    }

    fn e(call: u64, ret: Option<u64>, op: Op) -> Entry<Op> {
        Entry { call, ret, op }
    }

    #[test]
    fn sequential_and_concurrent_histories() {
        let ok = [e(0, Some(1), Op::W(1)), e(2, Some(3), Op::R(Some(1)))];
        assert_eq!(check::<Reg>(None, &ok, 1_000), Some(true));
        let stale = [e(0, Some(1), Op::W(1)), e(2, Some(3), Op::R(None))];
        assert_eq!(check::<Reg>(None, &stale, 1_000), Some(false));
        // Concurrent write: the read may see either.
        let conc = [
            e(0, Some(10), Op::W(1)),
            e(1, Some(2), Op::R(Some(1))),
            e(3, Some(4), Op::R(None)),
        ];
        assert_eq!(check::<Reg>(None, &conc, 1_000), Some(false));
        let conc2 = [
            e(0, Some(10), Op::W(1)),
            e(1, Some(2), Op::R(None)),
            e(3, Some(4), Op::R(Some(1))),
        ];
        assert_eq!(check::<Reg>(None, &conc2, 1_000), Some(true));
        // A write with an unknown outcome may land late.
        let unknown = [
            e(0, None, Op::W(5)),
            e(1, Some(2), Op::R(None)),
            e(3, Some(4), Op::R(Some(5))),
        ];
        assert_eq!(check::<Reg>(None, &unknown, 1_000), Some(true));
    }
}
