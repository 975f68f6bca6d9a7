//! One rule for "the in-service nodes agree", shared by `txmap status`, `txmap verify` and
//! `txmap check`, drift included.
//!
//! [`ClusterView::of`] is a pure function of what the nodes answered (their table statuses,
//! or why they did not answer), two time bounds and the time. Per table it says one of:
//! - [`TableView::Agree`]: every reachable in-service node serves the same generation and
//!   content, and none of them says its live files changed since it installed them;
//! - [`TableView::Busy`]: a transaction is under way, within its bound: nodes may differ for
//!   the moment (that is a commit, not a disagreement);
//! - [`TableView::Stuck`]: a transaction has been under way longer than the commit bound;
//! - [`TableView::InDoubt`]: a prepared transaction has waited for its decision longer than
//!   `in_doubt_ms`;
//! - [`TableView::Drifted`]: the nodes' journals agree, but on some in-service node the live
//!   files are not what it installed (a hand edit, a `postmap` run by hand): that node does not
//!   really serve the recorded content. `txmap commit TABLE` reinstalls it there;
//! - [`TableView::Disagree`]: nodes serve different generations or contents (or one lacks the
//!   table) with nothing under way to explain it.
//!
//! The tools map the view to their own codes: `status`/`verify` exit 5 for an unreachable
//! node, `Disagree` or `Drifted`, 8 for `Stuck` or `InDoubt`; `check` is CRITICAL for an
//! unreachable node, `Disagree`, `Drifted` and `InDoubt`, WARNING for `Stuck`.

use crate::proto::TableStatus;

/// A transaction holding a table on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// Since when (ms since the epoch).
    pub since_ms: u64,
    /// Prepared (durable), waiting for the decision.
    pub in_doubt: bool,
    /// Decided commit, its install under way (or retried).
    pub installing: bool,
}

/// One table as one node reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableObs {
    /// Table.
    pub table: String,
    /// Live generation (per the node's journal).
    pub generation: u64,
    /// sha256 (hex) of the live content (per the node's journal).
    pub sha256: Option<String>,
    /// A transaction holding the table.
    pub busy: Option<Busy>,
    /// The live files changed since the node installed them: what changed.
    pub drifted: Option<String>,
}

impl From<&TableStatus> for TableObs {
    fn from(t: &TableStatus) -> TableObs {
        TableObs {
            table: t.table.clone(),
            generation: t.generation,
            sha256: t.sha256.map(|s| s.to_string()),
            busy: t.prepared.as_ref().map(|p| Busy {
                since_ms: p.since_ms,
                in_doubt: p.durable && !p.installing,
                installing: p.installing,
            }),
            drifted: t.drifted.clone(),
        }
    }
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObs {
    /// Node.
    pub node: String,
    /// In service (per the asking node's config); only in-service nodes are judged.
    pub in_service: bool,
    /// Its tables, or why it did not answer.
    pub tables: Result<Vec<TableObs>, String>,
}

/// How long work may take before it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A prepared transaction waiting longer than this for its decision is in doubt.
    pub in_doubt_ms: u64,
    /// A transaction under way longer than this (`total_ms` + `commit_ms`) is stuck.
    pub commit_bound_ms: u64,
}

/// What the in-service nodes say about one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableView {
    /// They agree: this generation, this content.
    Agree {
        /// Generation (0: never committed).
        generation: u64,
        /// sha256 (hex).
        sha256: Option<String>,
    },
    /// A transaction is under way, within the commit bound.
    Busy {
        /// The oldest one's age (ms).
        age_ms: u64,
    },
    /// A transaction has been under way for longer than the commit bound.
    Stuck {
        /// Node, age (ms), installing (decided commit, install retried).
        nodes: Vec<(String, u64, bool)>,
    },
    /// A prepared transaction has waited for its decision longer than `in_doubt_ms`.
    InDoubt {
        /// Node, age (ms).
        nodes: Vec<(String, u64)>,
    },
    /// The journals agree on this generation, but these nodes' live files changed since.
    Drifted {
        /// Generation the journals record.
        generation: u64,
        /// Node, what changed.
        nodes: Vec<(String, String)>,
    },
    /// Different generations or contents with nothing under way (`None`: the node lacks the
    /// table).
    Disagree {
        /// Node, generation.
        nodes: Vec<(String, Option<u64>)>,
    },
}

impl TableView {
    /// `true` for [`TableView::Agree`] and [`TableView::Busy`]: nothing to report.
    pub fn agrees(&self) -> bool {
        matches!(self, TableView::Agree { .. } | TableView::Busy { .. })
    }

    /// One line for an operator (`None` when the nodes agree).
    pub fn describe(&self, table: &str) -> Option<String> {
        let secs = |ms: &u64| ms / 1000;
        match self {
            TableView::Agree { .. } | TableView::Busy { .. } => None,
            TableView::Stuck { nodes } => Some(
                nodes
                    .iter()
                    .map(|(n, age, installing)| {
                        if *installing {
                            format!(
                                "{table}: {n} decided commit not installed for {} s (storage?)",
                                secs(age)
                            )
                        } else {
                            format!("{table}: {n} transaction in progress for {} s", secs(age))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            TableView::InDoubt { nodes } => Some(
                nodes
                    .iter()
                    .map(|(n, age)| {
                        format!(
                            "{table}: {n} in doubt for {} s (prepared, no decision)",
                            secs(age)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            TableView::Drifted { generation, nodes } => {
                let who: Vec<String> = nodes
                    .iter()
                    .map(|(n, why)| format!("{n} ({why})"))
                    .collect();
                Some(format!(
                    "{table}: live table drifted on {} since generation {generation} was installed; `txmap commit {table}` reinstalls it",
                    who.join(", ")
                ))
            }
            TableView::Disagree { nodes } => {
                let gens: Vec<String> = nodes
                    .iter()
                    .map(|(n, g)| match g {
                        Some(g) => format!("{n} gen {g}"),
                        None => format!("{n} lacks it"),
                    })
                    .collect();
                Some(format!("{table}: nodes disagree ({})", gens.join(", ")))
            }
        }
    }
}

/// What the in-service nodes say, table by table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// In-service nodes that did not answer, and why.
    pub unreachable: Vec<(String, String)>,
    /// Every table any reachable in-service node reported, by name.
    pub tables: Vec<(String, TableView)>,
}

impl ClusterView {
    /// Judges the nodes' answers at `now_ms`.
    pub fn of(nodes: &[NodeObs], bounds: Bounds, now_ms: u64) -> ClusterView {
        let serving: Vec<&NodeObs> = nodes.iter().filter(|n| n.in_service).collect();
        let unreachable = serving
            .iter()
            .filter_map(|n| n.tables.as_ref().err().map(|e| (n.node.clone(), e.clone())))
            .collect();
        let answered: Vec<(&str, &[TableObs])> = serving
            .iter()
            .filter_map(|n| n.tables.as_deref().ok().map(|t| (n.node.as_str(), t)))
            .collect();
        let mut names: Vec<&str> = answered
            .iter()
            .flat_map(|(_, t)| t.iter().map(|t| t.table.as_str()))
            .collect();
        names.sort();
        names.dedup();
        let tables = names
            .into_iter()
            .map(|name| {
                let rows: Vec<(&str, Option<&TableObs>)> = answered
                    .iter()
                    .map(|(n, t)| (*n, t.iter().find(|t| t.table == name)))
                    .collect();
                (name.to_string(), table_view(&rows, bounds, now_ms))
            })
            .collect();
        ClusterView {
            unreachable,
            tables,
        }
    }

    /// Every in-service node answered and every table agrees (or is being committed).
    pub fn agree(&self) -> bool {
        self.unreachable.is_empty()
            && self
                .tables
                .iter()
                .all(|(_, v)| v.agrees() || self.stuck_only(v))
    }

    fn stuck_only(&self, v: &TableView) -> bool {
        matches!(v, TableView::Stuck { .. } | TableView::InDoubt { .. })
    }

    /// Some table's work is stuck or in doubt (the nodes may still agree).
    pub fn stuck(&self) -> bool {
        self.tables.iter().any(|(_, v)| self.stuck_only(v))
    }

    /// The view of `table`.
    pub fn table(&self, table: &str) -> Option<&TableView> {
        self.tables.iter().find(|(n, _)| n == table).map(|(_, v)| v)
    }
}

/// One table's view from its rows (reachable in-service nodes; `None`: the node lacks it).
fn table_view(rows: &[(&str, Option<&TableObs>)], bounds: Bounds, now_ms: u64) -> TableView {
    let present: Vec<(&str, &TableObs)> = rows
        .iter()
        .filter_map(|(n, t)| t.map(|t| (*n, t)))
        .collect();
    let busy: Vec<(&str, Busy)> = present
        .iter()
        .filter_map(|(n, t)| t.busy.map(|b| (*n, b)))
        .collect();
    let differ = present.len() != rows.len()
        || present
            .windows(2)
            .any(|w| (w[0].1.generation, &w[0].1.sha256) != (w[1].1.generation, &w[1].1.sha256));
    if differ && busy.is_empty() {
        return TableView::Disagree {
            nodes: rows
                .iter()
                .map(|(n, t)| (n.to_string(), t.map(|t| t.generation)))
                .collect(),
        };
    }
    let drifted: Vec<(String, String)> = present
        .iter()
        .filter_map(|(n, t)| t.drifted.as_ref().map(|d| (n.to_string(), d.clone())))
        .collect();
    if !drifted.is_empty() {
        let generation = present
            .iter()
            .find(|(_, t)| t.drifted.is_some())
            .map(|(_, t)| t.generation)
            .unwrap_or(0);
        return TableView::Drifted {
            generation,
            nodes: drifted,
        };
    }
    let age = |b: &Busy| now_ms.saturating_sub(b.since_ms);
    let in_doubt: Vec<(String, u64)> = busy
        .iter()
        .filter(|(_, b)| b.in_doubt && age(b) > bounds.in_doubt_ms)
        .map(|(n, b)| (n.to_string(), age(b)))
        .collect();
    if !in_doubt.is_empty() {
        return TableView::InDoubt { nodes: in_doubt };
    }
    let stuck: Vec<(String, u64, bool)> = busy
        .iter()
        .filter(|(_, b)| age(b) > bounds.commit_bound_ms)
        .map(|(n, b)| (n.to_string(), age(b), b.installing))
        .collect();
    if !stuck.is_empty() {
        return TableView::Stuck { nodes: stuck };
    }
    if let Some(oldest) = busy.iter().map(|(_, b)| age(b)).max() {
        return TableView::Busy { age_ms: oldest };
    }
    let first = present.first().map(|(_, t)| *t);
    TableView::Agree {
        generation: first.map(|t| t.generation).unwrap_or(0),
        sha256: first.and_then(|t| t.sha256.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        in_doubt_ms: 30_000,
        commit_bound_ms: 11_000,
    };

    fn t(generation: u64) -> TableObs {
        TableObs {
            table: "t".into(),
            generation,
            sha256: Some(format!("{generation:064}")),
            busy: None,
            drifted: None,
        }
    }

    fn node(name: &str, tables: Vec<TableObs>) -> NodeObs {
        NodeObs {
            node: name.into(),
            in_service: true,
            tables: Ok(tables),
        }
    }

    fn view(nodes: &[NodeObs]) -> TableView {
        ClusterView::of(nodes, B, 1_000_000)
            .table("t")
            .cloned()
            .expect("table t")
    }

    #[test]
    fn same_generation_and_content_agree() {
        let v = ClusterView::of(&[node("a", vec![t(3)]), node("b", vec![t(3)])], B, 0);
        assert!(v.agree() && !v.stuck());
        assert_eq!(
            v.table("t"),
            Some(&TableView::Agree {
                generation: 3,
                sha256: Some(format!("{:064}", 3))
            })
        );
    }

    #[test]
    fn a_drifted_node_is_named_even_when_the_journals_agree() {
        let mut b = t(3);
        b.drifted = Some("/x/t changed".into());
        let nodes = [
            node("a", vec![t(3)]),
            node("b", vec![b]),
            node("c", vec![t(3)]),
        ];
        let v = ClusterView::of(&nodes, B, 0);
        assert!(!v.agree());
        let tv = v.table("t").unwrap();
        assert_eq!(
            tv,
            &TableView::Drifted {
                generation: 3,
                nodes: vec![("b".into(), "/x/t changed".into())]
            }
        );
        let line = tv.describe("t").unwrap();
        assert!(line.contains("b (/x/t changed)"), "{line}");
        assert!(line.contains("`txmap commit t`"), "{line}");
    }

    #[test]
    fn drift_on_an_out_of_service_node_is_not_counted() {
        let mut b = t(3);
        b.drifted = Some("changed".into());
        let mut out = node("b", vec![b]);
        out.in_service = false;
        let v = ClusterView::of(&[node("a", vec![t(3)]), out], B, 0);
        assert!(v.agree(), "{v:?}");
    }

    #[test]
    fn different_generations_disagree_unless_a_transaction_is_under_way() {
        assert_eq!(
            view(&[node("a", vec![t(3)]), node("b", vec![t(2)])]),
            TableView::Disagree {
                nodes: vec![("a".into(), Some(3)), ("b".into(), Some(2))]
            }
        );
        let mut b = t(2);
        b.busy = Some(Busy {
            since_ms: 995_000,
            in_doubt: false,
            installing: true,
        });
        let v = view(&[node("a", vec![t(3)]), node("b", vec![b])]);
        assert_eq!(v, TableView::Busy { age_ms: 5_000 });
        assert!(v.agrees());
    }

    #[test]
    fn a_node_without_the_table_disagrees() {
        assert_eq!(
            view(&[node("a", vec![t(3)]), node("b", vec![])]),
            TableView::Disagree {
                nodes: vec![("a".into(), Some(3)), ("b".into(), None)]
            }
        );
    }

    #[test]
    fn old_transactions_are_stuck_then_in_doubt() {
        let busy = |since_ms, in_doubt| {
            let mut x = t(3);
            x.busy = Some(Busy {
                since_ms,
                in_doubt,
                installing: false,
            });
            x
        };
        let v = view(&[node("a", vec![t(3)]), node("b", vec![busy(985_000, true)])]);
        assert_eq!(
            v,
            TableView::Stuck {
                nodes: vec![("b".into(), 15_000, false)]
            }
        );
        let cv = ClusterView::of(
            &[node("a", vec![t(3)]), node("b", vec![busy(969_000, true)])],
            B,
            1_000_000,
        );
        assert_eq!(
            cv.table("t"),
            Some(&TableView::InDoubt {
                nodes: vec![("b".into(), 31_000)]
            })
        );
        assert!(cv.agree() && cv.stuck());
        // Staging (not durable) for as long is stuck, never in doubt.
        let v = view(&[node("a", vec![t(3)]), node("b", vec![busy(969_000, false)])]);
        assert!(matches!(v, TableView::Stuck { .. }), "{v:?}");
    }

    #[test]
    fn an_unreachable_node_is_listed_and_its_tables_are_not_judged() {
        let down = NodeObs {
            node: "b".into(),
            in_service: true,
            tables: Err("timed out".into()),
        };
        let v = ClusterView::of(&[node("a", vec![t(3)]), down], B, 0);
        assert_eq!(v.unreachable, vec![("b".into(), "timed out".into())]);
        assert!(!v.agree());
        assert!(v.table("t").is_some_and(|t| t.agrees()));
    }
}
