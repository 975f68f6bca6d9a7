//! A model of the layer around the commit on the Sympa node: the hook's request queue, the
//! daemon's group commit, pending records and the change order, with txmapd crashing at any
//! step, removals and the mark's write failing, and commits failing. The commit itself is one
//! atomic step here (its atomicity across nodes is what [`super::system`] checks).
//!
//! The decisions are txmap's own: which queued requests to adopt or remove
//! (`requests::plan`), which to remove once covered (`requests::after_cover`), the order a
//! new request takes (`requests::order_after`), and when a change is superseded
//! (`Change::supersedes`). The steps around them mirror `participant/src/hook.rs`
//! (`distribute`, `covered_requests`, `adopt_queued_requests`/`adopt_one`) and
//! `participant/src/converge.rs` (the pending retry); `docs/verification.md` lists them.
//!
//! # Properties
//! - **Exit 0 is true**: when a hook exits 0, the cluster serves its content or a later one.
//! - **No lost update**: from every reachable state, once Sympa is done and no fault happens
//!   any more, the daemon (restarted if down, adopting and retrying) reaches a state where the
//!   cluster serves Sympa's last content, and nothing is left queued or pending.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use txmap_common::proto::Change;
use txmap_common::requests::{self, Queued};

/// Defects reintroduced for the checker to find (test only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDefect {
    /// After its commit, the daemon removes every queued request of the table, not only those
    /// its commit covered (the old `remove_file(requests/<table>)`).
    RemovesOthersRequests,
    /// Adoption ignores the mark: a request already served, left behind by a failed removal,
    /// is distributed again.
    IgnoresTheMark,
    /// Requests the daemon cannot read are removed (the old behaviour with another user).
    DropsUnreadable,
}

/// The bounds of one check.
#[derive(Debug, Clone)]
pub struct QueueBounds {
    /// Changes Sympa makes (each rewrites the source, then runs the hook).
    pub changes: u8,
    /// Faults in one schedule: a crash of txmapd, a failed commit, a failed removal, a failed
    /// write of the mark, a request the daemon cannot read (yet).
    pub faults: u8,
    /// Reintroduced defects.
    pub defects: Vec<QueueDefect>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Hook {
    /// Not started.
    Idle,
    /// Its request is queued as `requests/<table>@order`; it is about to talk to the socket.
    Queued(u64),
    /// Accepted by the daemon, waiting for the commit that carries it.
    Waiting,
    /// Exited with this code.
    Done(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Accepted {
    hooks: Vec<usize>,
    change: Change,
    content: u8,
    order: u64,
}

/// The state: what is durable (files, mark, pending, counter, cluster) and what txmapd holds in
/// memory (lost when it crashes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueState {
    hooks: Vec<Hook>,
    /// `requests/`: order → (content, readable by the daemon).
    files: BTreeMap<u64, (u8, bool)>,
    seen: Option<u64>,
    counter: u64,
    /// The pending record: its change and its snapshot's content.
    pending: Option<(Change, u8)>,
    /// What the cluster serves: content and the newest change installed.
    served: (u8, Option<Change>),
    up: bool,
    latest: Option<Accepted>,
    running: Option<Accepted>,
    faults: u8,
}

const EPOCH: u64 = 1;

impl QueueState {
    fn initial(b: &QueueBounds) -> QueueState {
        QueueState {
            hooks: vec![Hook::Idle; b.changes as usize],
            files: BTreeMap::new(),
            seen: None,
            counter: 0,
            pending: None,
            served: (0, None),
            up: true,
            latest: None,
            running: None,
            faults: 0,
        }
    }

    fn queued(&self) -> Vec<Queued> {
        self.files
            .keys()
            .map(|o| Queued {
                order: *o,
                path: PathBuf::from(requests::file_name("t", *o)),
                regular: true,
            })
            .collect()
    }

    fn next_change(&mut self) -> Change {
        self.counter += 1;
        Change {
            epoch: EPOCH,
            seq: self.counter,
        }
    }

    /// A commit of `change` with `content` that succeeded: installed unless superseded.
    fn install(&mut self, change: Change, content: u8) {
        if !self.served.1.is_some_and(|n| n.supersedes(&change)) {
            self.served = (content, Some(change));
        }
    }

    /// Removes the requests up to `order` once covered (the mark first); `fail_mark` and
    /// `fail_unlink` are the storage faults of those writes.
    fn cover(&mut self, order: u64, fail_mark: bool, fail_unlink: bool, b: &QueueBounds) {
        let published = !fail_mark;
        if published {
            self.seen = Some(self.seen.map_or(order, |s| s.max(order)));
        }
        let gone: Vec<u64> = if b.defects.contains(&QueueDefect::RemovesOthersRequests) {
            self.files.keys().copied().collect()
        } else {
            requests::after_cover(&self.queued(), order, published)
                .iter()
                .map(|q| q.order)
                .collect()
        };
        for (i, o) in gone.into_iter().enumerate() {
            // A failed removal keeps the first file it should have removed.
            if !(fail_unlink && i == 0) {
                self.files.remove(&o);
            }
        }
    }

    fn respond(&mut self, hooks: &[usize], code: u8) {
        for h in hooks {
            if self.hooks[*h] == Hook::Waiting {
                self.hooks[*h] = Hook::Done(code);
            }
        }
    }

    fn serving(&self) -> bool {
        self.latest.is_some() || self.running.is_some()
    }

    /// The newest content Sympa wrote so far.
    fn written(&self) -> u8 {
        self.hooks.iter().filter(|h| **h != Hook::Idle).count() as u8
    }
}

/// One step: every successor of `s` with a line saying what happened.
fn successors(s: &QueueState, b: &QueueBounds, faults_allowed: bool) -> Vec<(QueueState, String)> {
    let mut out = Vec::new();
    let can_fault = faults_allowed && s.faults < b.faults;
    let fault = |mut n: QueueState| {
        n.faults += 1;
        n
    };
    // Sympa: the next change, once the previous hook has exited (Sympa holds its lock).
    if let Some(k) = s.hooks.iter().position(|h| *h == Hook::Idle) {
        if k == 0 || matches!(s.hooks[k - 1], Hook::Done(_)) {
            let content = k as u8 + 1;
            if let Some(order) = requests::order_after(&s.queued(), s.seen) {
                for unreadable in [false, true] {
                    if unreadable && !can_fault {
                        continue;
                    }
                    let mut n = s.clone();
                    n.files.insert(order, (content, !unreadable));
                    n.hooks[k] = Hook::Queued(order);
                    if unreadable {
                        n = fault(n);
                    }
                    out.push((
                        n,
                        format!(
                            "hook {k}: Sympa writes content {content}, queued as @{order}{}",
                            if unreadable {
                                " (not readable by txmapd yet)"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
            }
        }
    }
    // A hook gives up waiting (its deadline): it exits 6, its request stays queued, and Sympa
    // may go on with its next change while the daemon still works on this one.
    for (k, h) in s.hooks.iter().enumerate() {
        if *h == Hook::Waiting {
            let mut n = s.clone();
            n.hooks[k] = Hook::Done(6);
            out.push((n, format!("hook {k}: gives up waiting, exits 6")));
        }
    }
    // A hook talks to the socket.
    for (k, h) in s.hooks.iter().enumerate() {
        let Hook::Queued(order) = *h else { continue };
        let mut n = s.clone();
        if !s.up {
            n.hooks[k] = Hook::Done(6);
            out.push((n, format!("hook {k}: txmapd down, exits 6 (stays queued)")));
            continue;
        }
        let change = n.next_change();
        let mut acc = Accepted {
            hooks: vec![k],
            change,
            content: k as u8 + 1,
            order,
        };
        if let Some(older) = n.latest.take() {
            acc.hooks.extend(older.hooks);
            acc.order = acc.order.max(older.order);
        }
        n.latest = Some(acc);
        n.hooks[k] = Hook::Waiting;
        out.push((n, format!("hook {k}: accepted as change {}", change.seq)));
    }
    if s.up {
        // The commit takes the newest accepted content.
        if s.running.is_none() {
            if let Some(a) = &s.latest {
                let mut n = s.clone();
                n.running = n.latest.take();
                // Its snapshot is the pending record's from here (commit_tracked's intent).
                n.pending = Some((a.change, a.content));
                out.push((n, format!("txmapd commits change {}", a.change.seq)));
            }
        }
        if let Some(a) = &s.running {
            for (ok, fail_mark, fail_unlink) in [
                (true, false, false),
                (false, false, false),
                (true, true, false),
                (true, false, true),
            ] {
                let faulty = !ok || fail_mark || fail_unlink;
                if faulty && !can_fault {
                    continue;
                }
                let mut n = s.clone();
                let a = a.clone();
                n.running = None;
                if ok {
                    n.install(a.change, a.content);
                    n.pending = None;
                }
                n.cover(a.order, fail_mark, fail_unlink, b);
                n.respond(&a.hooks, if ok { 0 } else { 1 });
                if faulty {
                    n = fault(n);
                }
                out.push((
                    n,
                    format!(
                        "txmapd: change {} {}{}{}",
                        a.change.seq,
                        if ok { "committed" } else { "failed, pending" },
                        if fail_mark {
                            "; the mark's write fails"
                        } else {
                            ""
                        },
                        if fail_unlink { "; a removal fails" } else { "" }
                    ),
                ));
            }
        }
        // A pending retry (none while a hook request is served).
        if let (Some((c, content)), false) = (s.pending, s.serving()) {
            let mut n = s.clone();
            n.install(c, content);
            n.pending = None;
            out.push((
                n,
                format!("txmapd retries pending change {}: committed", c.seq),
            ));
        }
        // Adoption of the queue (none while a hook request is served).
        if !s.serving() {
            let seen = if b.defects.contains(&QueueDefect::IgnoresTheMark) {
                None
            } else {
                s.seen
            };
            let plan = requests::plan(&s.queued(), seen);
            if !plan.remove.is_empty() || plan.adopt.is_some() {
                for fail_mark in [false, true] {
                    if fail_mark && !can_fault {
                        continue;
                    }
                    let mut n = s.clone();
                    for q in &plan.remove {
                        n.files.remove(&q.order);
                    }
                    let mut what =
                        format!("txmapd tidies the queue ({} removed)", plan.remove.len());
                    if let Some(q) = &plan.adopt {
                        let (content, readable) = n.files[&q.order];
                        if readable {
                            let c = n.next_change();
                            n.pending = Some((c, content));
                            n.cover(q.order, fail_mark, false, b);
                            what = format!("txmapd adopts @{} as change {}", q.order, c.seq);
                        } else if b.defects.contains(&QueueDefect::DropsUnreadable) {
                            n.files.remove(&q.order);
                            what = format!("txmapd cannot read @{} and removes it", q.order);
                        } else if fail_mark {
                            continue;
                        } else {
                            what = format!("txmapd cannot read @{} yet: kept", q.order);
                        }
                    } else if fail_mark {
                        continue;
                    }
                    if fail_mark {
                        n = fault(n);
                        what.push_str("; the mark's write fails");
                    }
                    if n != *s {
                        out.push((n, what));
                    }
                }
            }
        }
        // The operator fixes the group (the file becomes readable).
        for (o, (c, readable)) in &s.files {
            if !readable {
                let mut n = s.clone();
                n.files.insert(*o, (*c, true));
                out.push((
                    n,
                    format!("@{o} made readable (txmapd's user joins the group)"),
                ));
            }
        }
        // A crash: memory is lost, the hooks waiting get no answer (exit 6).
        if can_fault {
            let mut n = s.clone();
            n.up = false;
            n.latest = None;
            n.running = None;
            for h in n.hooks.iter_mut() {
                if *h == Hook::Waiting {
                    *h = Hook::Done(6);
                }
            }
            out.push((fault(n), "txmapd killed".to_string()));
        }
    } else {
        let mut n = s.clone();
        n.up = true;
        out.push((n, "txmapd starts".to_string()));
    }
    out
}

/// What a check found.
#[derive(Debug)]
pub struct QueueReport {
    /// States explored.
    pub states: usize,
    /// The first violation, with the steps that reach it.
    pub counterexample: Option<(String, Vec<String>)>,
}

/// The properties of one state (exit 0 is true).
fn safety(s: &QueueState) -> Option<String> {
    for (k, h) in s.hooks.iter().enumerate() {
        if *h == Hook::Done(0) && s.served.0 < k as u8 + 1 {
            return Some(format!(
                "hook {k} exited 0 but the cluster serves content {} (older than its {})",
                s.served.0,
                k + 1
            ));
        }
    }
    None
}

/// No lost update: with no more faults (and the file made readable), the daemon converges on
/// Sympa's last content, nothing left queued or pending.
fn drain(s: &QueueState, b: &QueueBounds) -> Option<String> {
    let mut cur = s.clone();
    for _ in 0..200 {
        let done = cur.hooks.iter().all(|h| matches!(h, Hook::Done(_)));
        if done
            && cur.up
            && !cur.serving()
            && cur.pending.is_none()
            && requests::plan(&cur.queued(), cur.seen).adopt.is_none()
        {
            return (cur.served.0 != cur.written()).then(|| {
                format!(
                    "no lost update: after the faults stop the cluster serves content {}, not Sympa's last ({}); queued {:?}, mark {:?}",
                    cur.served.0,
                    cur.written(),
                    cur.files.keys().collect::<Vec<_>>(),
                    cur.seen
                )
            });
        }
        // The first fault-free step, in the order the daemon's loops favour.
        let next = successors(&cur, b, false).into_iter().next();
        match next {
            Some((n, _)) => cur = n,
            None => return Some("the drain is stuck".into()),
        }
    }
    Some("the drain does not end".into())
}

/// Breadth-first over every schedule within the bounds.
pub fn check_queue(b: &QueueBounds) -> QueueReport {
    let init = QueueState::initial(b);
    let mut seen: HashSet<QueueState> = HashSet::new();
    let mut parent: Vec<(usize, String)> = vec![(usize::MAX, "start".into())];
    let mut states: Vec<QueueState> = vec![init.clone()];
    let mut queue: VecDeque<usize> = VecDeque::from([0]);
    seen.insert(init);
    let trace = |parent: &Vec<(usize, String)>, mut i: usize| {
        let mut t = Vec::new();
        while i != usize::MAX {
            t.push(parent[i].1.clone());
            i = parent[i].0;
        }
        t.reverse();
        t.into_iter()
            .enumerate()
            .map(|(n, l)| format!("  {n:>2}. {l}"))
            .collect::<Vec<_>>()
    };
    while let Some(i) = queue.pop_front() {
        let s = states[i].clone();
        if let Some(v) = safety(&s).or_else(|| drain(&s, b)) {
            return QueueReport {
                states: states.len(),
                counterexample: Some((v, trace(&parent, i))),
            };
        }
        for (n, what) in successors(&s, b, true) {
            if seen.insert(n.clone()) {
                states.push(n);
                parent.push((i, what));
                queue.push_back(states.len() - 1);
            }
        }
    }
    QueueReport {
        states: states.len(),
        counterexample: None,
    }
}
