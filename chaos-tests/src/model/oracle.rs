//! Nondeterministic choices inside one step, enumerated exhaustively.
//!
//! A model step is written as straight-line code that mirrors the shell it models; wherever
//! the real world could go two ways (a storage call fails, an answer is lost) it asks the
//! [`Oracle`]. The explorer runs the step once per *choice sequence*: the first run takes
//! choice 0 everywhere, and [`Oracle::advance`] moves to the next sequence in depth-first order
//! until every combination has been run. Choice 0 is always the fault-free one, so the
//! termination drain is simply "always choice 0".

/// The choices of one run of a step, and the notes that explain them in a trace.
#[derive(Debug, Default)]
pub struct Oracle {
    plan: Vec<u8>,
    arity: Vec<u8>,
    pos: usize,
    /// Build the human-readable notes (only while printing a trace: formatting is slow).
    pub verbose: bool,
    /// Every choice is 0 (the fault-free drain).
    pub fault_free: bool,
    /// What the choices meant, in order (only when `verbose`).
    pub notes: Vec<String>,
}

impl Oracle {
    /// An oracle for exploring (all choice sequences) or for the fault-free drain.
    pub fn new(verbose: bool, fault_free: bool) -> Oracle {
        Oracle {
            verbose,
            fault_free,
            ..Oracle::default()
        }
    }

    /// Rewinds to the start of the current choice sequence (before each run of a step).
    pub fn rewind(&mut self) {
        self.pos = 0;
        self.notes.clear();
    }

    /// Moves to the next choice sequence; `false` when every one has been run.
    pub fn advance(&mut self) -> bool {
        self.plan.truncate(self.pos);
        self.arity.truncate(self.pos);
        while let Some(c) = self.plan.pop() {
            let n = self.arity.pop().unwrap_or(0);
            if c + 1 < n {
                self.plan.push(c + 1);
                self.arity.push(n);
                return true;
            }
        }
        false
    }

    /// A choice among `n` (0 = the normal, fault-free way).
    pub fn choose(&mut self, n: u8) -> u8 {
        if self.fault_free || n <= 1 {
            return 0;
        }
        let c = if self.pos < self.plan.len() {
            self.plan[self.pos]
        } else {
            self.plan.push(0);
            self.arity.push(n);
            0
        };
        self.pos += 1;
        c
    }

    /// Whether a fault happens here; each one spends one unit of the fault budget.
    pub fn fault(&mut self, budget: &mut u8, what: impl FnOnce() -> String) -> bool {
        if *budget == 0 || self.fault_free {
            return false;
        }
        if self.choose(2) == 1 {
            *budget -= 1;
            self.note(|| format!("FAULT: {}", what()));
            true
        } else {
            false
        }
    }

    /// Whether a message (a request or its answer) is lost here (free: no budget).
    pub fn lost(&mut self, what: impl FnOnce() -> String) -> bool {
        if self.choose(2) == 1 {
            self.note(|| format!("lost: {}", what()));
            true
        } else {
            false
        }
    }

    /// Adds a note to the trace.
    pub fn note(&mut self, f: impl FnOnce() -> String) {
        if self.verbose {
            self.notes.push(f());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_sequence_is_run_once() {
        // A step with a binary choice, then a ternary one only on the first branch.
        let mut o = Oracle::new(false, false);
        let mut seen = Vec::new();
        loop {
            o.rewind();
            let a = o.choose(2);
            let b = if a == 0 { o.choose(3) } else { 9 };
            seen.push((a, b));
            if !o.advance() {
                break;
            }
        }
        assert_eq!(seen, vec![(0, 0), (0, 1), (0, 2), (1, 9)]);
    }
}
