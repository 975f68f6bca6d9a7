//! `txmap-model`: runs the model checker of txmap's commit protocol (see
//! `docs/verification.md`). Exit 0: no violation within the bounds; 1: a counterexample
//! (printed as a numbered trace); 2: usage.

use clap::Parser;
use std::process::ExitCode;
use txmap_chaos_tests::model::{check, explore, Bounds};
use txmap_common::defects::{self, Defect};

/// Model checker of txmap's two-phase commit (drives common's machine and coordinator rules).
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent coordinators on the same table (1 or 2).
    #[arg(long, default_value_t = Bounds::ci().coordinators)]
    coordinators: usize,
    /// Faults per schedule (crash, power cut, storage error, duplicate, eviction, bad build).
    #[arg(long, default_value_t = Bounds::ci().faults)]
    faults: u8,
    /// Transactions per coordinator (conflict retries).
    #[arg(long, default_value_t = Bounds::ci().attempts)]
    attempts: u8,
    /// No operator `txmap recover` step.
    #[arg(long)]
    no_operator: bool,
    /// No delayed outcome questions (a fault kind otherwise).
    #[arg(long)]
    no_late_questions: bool,
    /// No fault-free drain (termination and cleanliness are then not checked).
    #[arg(long)]
    no_drain: bool,
    /// Schedules of at most this many steps.
    #[arg(long, default_value_t = Bounds::ci().max_depth)]
    max_depth: usize,
    /// Stop after this many states.
    #[arg(long, default_value_t = Bounds::ci().max_states)]
    max_states: usize,
    /// Put a defect of issue 9 back (test only): install-failed-drops-to-prepared,
    /// recover-counts-non-members, abort-from-missing-memory,
    /// abort-after-failed-decision-write, decision-visible-before-durable,
    /// finish-forgets-commit.
    #[arg(long)]
    defect: Vec<String>,
    /// Print the fault-free run from the initial state and exit.
    #[arg(long)]
    happy_path: bool,
}

fn defect(name: &str) -> Option<Defect> {
    Defect::ALL.into_iter().find(|d| {
        let mut kebab = String::new();
        for (i, c) in format!("{d:?}").chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                kebab.push('-');
            }
            kebab.push(c.to_ascii_lowercase());
        }
        kebab == name
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut ds = Vec::new();
    for name in &a.defect {
        match defect(name) {
            Some(d) => ds.push(d),
            None => {
                eprintln!("unknown defect `{name}`");
                return ExitCode::from(2);
            }
        }
    }
    defects::set(&ds);
    let b = Bounds {
        coordinators: a.coordinators.clamp(1, 2),
        faults: a.faults,
        attempts: a.attempts.max(1),
        operator: !a.no_operator,
        late_questions: !a.no_late_questions,
        drain: !a.no_drain,
        max_states: a.max_states,
        max_depth: a.max_depth,
        progress: true,
        ..Bounds::ci()
    };
    if a.happy_path {
        return match explore::happy_path(&b) {
            Ok(steps) => {
                for (n, s) in steps.iter().enumerate() {
                    println!("{:>3}. {s}", n + 1);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        };
    }
    println!("bounds: {b:?}; defects: {ds:?}");
    let r = check(&b);
    println!("{r}");
    if r.counterexample.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
