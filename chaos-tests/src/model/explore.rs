//! The explorer: breadth-first over hashed states, so the first violation found has a
//! shortest trace; a fault-free drain from every state checks termination and cleanliness.

use super::oracle::Oracle;
use super::system::System;
use super::Bounds;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// A property violation, with the numbered steps that reach it.
#[derive(Debug, Clone)]
pub struct Counterexample {
    /// The property and what broke it.
    pub violation: String,
    /// Numbered, readable steps from the initial state.
    pub trace: Vec<String>,
    /// The nodes at the end.
    pub last_state: String,
}

impl std::fmt::Display for Counterexample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "VIOLATION: {}", self.violation)?;
        for line in &self.trace {
            writeln!(f, "{line}")?;
        }
        writeln!(f, "  state at the end:")?;
        write!(f, "{}", self.last_state)
    }
}

/// What a check found.
#[derive(Debug)]
pub struct Report {
    /// Distinct states explored.
    pub states: usize,
    /// Transitions run (including those to states already seen).
    pub transitions: u64,
    /// Longest trace (BFS depth) reached.
    pub depth: usize,
    /// Whether every state within the bounds was explored (`false`: `max_states` was hit).
    pub complete: bool,
    /// Wall time.
    pub seconds: f64,
    /// The first violation found, if any.
    pub counterexample: Option<Counterexample>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} states, {} transitions, depth {}, {:.1} s, {}",
            self.states,
            self.transitions,
            self.depth,
            self.seconds,
            if self.complete {
                "exhaustive within the bounds"
            } else {
                "STOPPED at max_states"
            }
        )?;
        match &self.counterexample {
            None => write!(f, ", no violation"),
            Some(c) => write!(f, "\n{c}"),
        }
    }
}

/// Every successor of `s`: one per step and per choice sequence, with its label when `verbose`.
pub fn successors(s: &System, verbose: bool) -> Vec<(System, String)> {
    let mut out = Vec::new();
    for step in s.steps() {
        let head = if verbose {
            s.describe(&step)
        } else {
            String::new()
        };
        let mut o = Oracle::new(verbose, false);
        loop {
            o.rewind();
            let mut t = s.clone();
            t.apply(&step, &mut o);
            let label = if verbose {
                let mut l = head.clone();
                for n in &o.notes {
                    l.push_str("\n       ");
                    l.push_str(n);
                }
                l
            } else {
                String::new()
            };
            out.push((t, label));
            if !o.advance() {
                break;
            }
        }
    }
    out
}

/// The fault-free drain: always the first drain step that changes the state, choice 0
/// everywhere (no fault, no loss), until nothing changes. States known to drain cleanly are
/// remembered: a drain that reaches one stops there.
#[derive(Debug)]
pub struct Drain {
    ok: HashSet<u64>,
    limit: usize,
}

impl Drain {
    fn new(limit: usize) -> Drain {
        Drain {
            ok: HashSet::new(),
            limit,
        }
    }

    fn step(s: &System, verbose: bool) -> Option<(System, String)> {
        let h = s.digest();
        for step in s.drain_steps() {
            let mut o = Oracle::new(verbose, true);
            let mut t = s.clone();
            t.apply(&step, &mut o);
            if t.digest() != h {
                let mut l = if verbose {
                    s.describe(&step)
                } else {
                    String::new()
                };
                for n in &o.notes {
                    l.push_str("\n       ");
                    l.push_str(n);
                }
                return Some((t, l));
            }
        }
        None
    }

    /// Runs the drain from `s`; `Err((violation, labels))` if it breaks a property or does not
    /// settle.
    fn run(&mut self, s: &System, verbose: bool) -> Result<(), (String, Vec<String>, String)> {
        let mut cur = s.clone();
        let mut path = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..self.limit {
            let h = cur.digest();
            if !verbose && self.ok.contains(&h) {
                self.ok.extend(path);
                return Ok(());
            }
            path.push(h);
            if let Err(v) = cur.check_safety() {
                return Err((v, labels, cur.summary()));
            }
            match Self::step(&cur, verbose) {
                Some((t, l)) => {
                    labels.push(l);
                    cur = t;
                }
                None => {
                    return match cur.check_quiet() {
                        Ok(()) => {
                            self.ok.extend(path);
                            Ok(())
                        }
                        Err(v) => Err((v, labels, cur.summary())),
                    };
                }
            }
        }
        Err((
            format!(
                "TERMINATION: the fault-free drain did not settle in {} steps",
                self.limit
            ),
            labels,
            cur.summary(),
        ))
    }
}

/// Explores every state reachable within `b` and checks the properties in each.
pub fn check(b: &Bounds) -> Report {
    let started = Instant::now();
    let init = System::new(b.coordinators, b.faults, b.attempts, b.operator)
        .with_late_questions(b.late_questions);
    // Per state: (parent id, successor ordinal, depth).
    let mut parents: Vec<(u32, u32, u16)> = vec![(u32::MAX, 0, 0)];
    let mut seen: HashMap<u64, u32> = HashMap::new();
    seen.insert(init.digest(), 0);
    let mut queue: VecDeque<(System, u32)> = VecDeque::new();
    queue.push_back((init.clone(), 0));
    let mut drain = Drain::new(b.drain_limit);
    let mut transitions = 0u64;
    let mut depth = 0usize;
    let mut found: Option<(u32, String, Vec<String>, String)> = None;
    if b.drain {
        if let Err((v, l, last)) = drain.run(&init, false) {
            found = Some((0, v, l, last));
        }
    }
    let mut complete = true;
    'bfs: while let Some((s, id)) = queue.pop_front() {
        if found.is_some() {
            break;
        }
        let d = parents[id as usize].2;
        if d as usize >= b.max_depth {
            continue;
        }
        for (ordinal, (t, _)) in successors(&s, false).into_iter().enumerate() {
            transitions += 1;
            let h = t.digest();
            if seen.contains_key(&h) {
                continue;
            }
            let tid = parents.len() as u32;
            seen.insert(h, tid);
            parents.push((id, ordinal as u32, d + 1));
            depth = depth.max(d as usize + 1);
            if let Err(v) = t.check_safety() {
                found = Some((tid, v, Vec::new(), t.summary()));
                break 'bfs;
            }
            if b.drain {
                if let Err((v, l, last)) = drain.run(&t, false) {
                    found = Some((tid, v, l, last));
                    break 'bfs;
                }
            }
            if b.progress && parents.len().is_multiple_of(100_000) {
                eprintln!(
                    "  {} states, depth {}, queue {}, {:.0} s",
                    parents.len(),
                    d + 1,
                    queue.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            if parents.len() >= b.max_states {
                complete = false;
                break 'bfs;
            }
            queue.push_back((t, tid));
        }
    }
    let counterexample = found.map(|(id, violation, _, _)| {
        let (trace, last, drained) = replay(&init, &parents, id, b);
        let mut violation = violation;
        if drained && !violation.contains("drain") {
            violation.push_str(" (reached by the fault-free drain after the numbered steps)");
        }
        Counterexample {
            violation,
            trace,
            last_state: last,
        }
    });
    Report {
        states: parents.len(),
        transitions,
        depth,
        complete,
        seconds: started.elapsed().as_secs_f64(),
        counterexample,
    }
}

/// Rebuilds the readable trace to state `id` (and the drain after it, if that is where the
/// violation is).
fn replay(
    init: &System,
    parents: &[(u32, u32, u16)],
    id: u32,
    b: &Bounds,
) -> (Vec<String>, String, bool) {
    let mut path = Vec::new();
    let mut cur = id;
    while cur != 0 {
        let (p, ordinal, _) = parents[cur as usize];
        path.push(ordinal);
        cur = p;
    }
    path.reverse();
    let mut s = init.clone();
    let mut trace = Vec::new();
    for (n, ordinal) in path.iter().enumerate() {
        let mut succ = successors(&s, true);
        let (t, label) = succ.swap_remove(*ordinal as usize);
        trace.push(format!("  {:>2}. {label}", n + 1));
        s = t;
    }
    if s.check_safety().is_err() {
        return (trace, s.summary(), false);
    }
    let mut d = Drain::new(b.drain_limit);
    match d.run(&s, true) {
        Err((_, labels, last)) => {
            trace.push("  -- faults stop; the fault-free drain runs:".into());
            let base = trace.len();
            let total = labels.len();
            for (n, l) in labels.into_iter().enumerate() {
                if total > 40 && (20..total - 10).contains(&n) {
                    if n == 20 {
                        trace.push(format!("  ... ({} more drain steps) ...", total - 30));
                    }
                    continue;
                }
                trace.push(format!("  {:>2}. {l}", base + n));
            }
            (trace, last, true)
        }
        Ok(()) => (trace, s.summary(), false),
    }
}

/// The steps a drain would take from the initial state (a smoke check of the model itself).
pub fn happy_path(b: &Bounds) -> Result<Vec<String>, String> {
    let s = System::new(b.coordinators, 0, b.attempts, false);
    let mut d = Drain::new(b.drain_limit);
    d.run(&s, true)
        .map(|()| {
            let mut out = Vec::new();
            let mut cur = s.clone();
            while let Some((t, l)) = Drain::step(&cur, true) {
                out.push(l);
                cur = t;
            }
            out
        })
        .map_err(|(v, l, last)| format!("{v}\n{}\n{last}", l.join("\n")))
}
