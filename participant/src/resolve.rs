//! In-doubt resolution: what this node answers about a transaction (`Outcome`), and the loop
//! that resolves prepared transactions and retries installs that failed.

use crate::server::Node;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};
use txmap_common::coordinator::{log_answer, resolve, Heard, LogAnswer};
use txmap_common::decision::{DecisionLog, DecisionRecord, Verdict};
use txmap_common::machine::{Active, Event, Phase};
use txmap_common::now_ms;
use txmap_common::proto::{OutcomeAnswer, Refusal, Request, Response, TxId};
use txmap_coordinator::cluster::{ask, Cluster};

/// How long a local retry (an install that failed, a cleanup that failed) waits after its
/// `failures`-th failure (counted from 0): 1 s, doubling, at most 30 s.
pub(crate) fn retry_wait_ms(failures: u32) -> u64 {
    (1000u64 << failures.min(5)).min(30_000)
}

impl Node {
    /// What this node knows of `txid` (see [`Request::Outcome`]): its decision log first (it
    /// may be the coordinator's node; see [`log_answer`]), then its own participant state (see
    /// the proof rule of the machine's `Query`).
    pub(crate) async fn outcome(
        &self,
        table: &str,
        txid: TxId,
        generation: u64,
        coordinated_here: bool,
        fence: bool,
    ) -> Result<OutcomeAnswer, Response> {
        let storage = |e: std::io::Error| {
            Response::Refused(Refusal::Storage {
                op: "decision log".into(),
                path: self.cfg.state_dir.display().to_string(),
                error: e.to_string(),
            })
        };
        let answer = |d: &DecisionRecord| match d.verdict {
            Verdict::Commit => OutcomeAnswer::Committed {
                generation: d.generation,
            },
            Verdict::Abort => OutcomeAnswer::Aborted,
        };
        let slot = self.slot(table)?.clone();
        let log = DecisionLog::new(&self.cfg.state_dir);
        let decision = log.get(txid).map_err(storage)?;
        let open = log.open_record(txid).map_err(storage)?;
        let mut st = slot.state.lock().await;
        self.flush(&slot, &st)?;
        let own = st
            .active
            .as_ref()
            .filter(|a| a.txid == txid && a.phase == Phase::Prepared)
            .filter(|a| a.coordinator == self.cfg.node)
            .cloned();
        let from_log = if coordinated_here {
            log_answer(
                decision.as_ref().map(|d| (d.verdict, d.generation)),
                open.as_ref().map(|o| log.coordinator_alive(o)),
                fence,
            )
        } else {
            LogAnswer::AskParticipant
        };
        match from_log {
            LogAnswer::Answer(x) => Ok(x),
            LogAnswer::Fence => {
                drop(st);
                let (generation, nodes) = match (&open, &own) {
                    (Some(o), _) => (o.generation, o.nodes.clone()),
                    (None, Some(a)) => (a.generation, a.nodes.clone()),
                    (None, None) => (generation, Vec::new()),
                };
                let d = log
                    .decide(&DecisionRecord::fence(txid, table, generation, nodes))
                    .map_err(storage)?;
                info!(%txid, verdict = %d.verdict, "in-doubt query about a transaction whose coordinator is gone: its decision stands");
                Ok(answer(&d))
            }
            LogAnswer::AskParticipant => {
                let actions = st.step(
                    Event::Query {
                        txid,
                        generation,
                        fence,
                    },
                    now_ms(),
                );
                match self.execute(&slot, st, actions).await {
                    Response::Outcome(x) => Ok(x),
                    other => Err(other),
                }
            }
        }
    }

    /// Resolves prepared transactions whose decision has not arrived: asks the coordinator's
    /// node (which fences a dead coordinator's transaction), and when that node cannot be
    /// reached for half the in-doubt bound, asks the transaction's other nodes (cooperative
    /// termination); concludes only what [`resolve`] allows. Also retries the renames of
    /// transactions decided commit whose install failed (a storage error), with backoff.
    pub(crate) async fn resolve_loop(live: Arc<crate::server::Live>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut install_retry: HashMap<String, (u64, u32)> = HashMap::new();
        loop {
            tick.tick().await;
            // The current node and client, each tick (a reload may have swapped them).
            let (this, cluster) = live.both();
            for slot in this.slots.values() {
                let active = slot.state.lock().await.active.clone();
                let table = slot.table.name.clone();
                match active {
                    Some(a) if a.phase == Phase::Installing => {
                        let (next, tries) = install_retry.get(&table).copied().unwrap_or((0, 0));
                        if now_ms() < next {
                            continue;
                        }
                        let resp = this
                            .decide(
                                &table,
                                Event::Commit {
                                    txid: a.txid,
                                    generation: a.generation,
                                },
                                None,
                            )
                            .await;
                        if matches!(resp, Response::Committed { .. }) {
                            info!(%table, txid = %a.txid, tries = tries + 1, "interrupted commit finished");
                            install_retry.remove(&table);
                        } else {
                            let wait = retry_wait_ms(tries);
                            warn!(%table, txid = %a.txid, answer = %resp, retry_ms = wait, "commit decided but not installed yet; retrying");
                            install_retry.insert(table, (now_ms() + wait, tries + 1));
                        }
                    }
                    Some(a) if a.phase == Phase::Prepared => {
                        install_retry.remove(&table);
                        this.resolve_one(&cluster, &table, &a).await;
                    }
                    _ => {
                        install_retry.remove(&table);
                    }
                }
            }
        }
    }

    pub(crate) async fn resolve_one(&self, cluster: &Cluster, table: &str, a: &Active) {
        let age = now_ms().saturating_sub(a.since_ms);
        if age < 1000 {
            return;
        }
        let q = Request::Outcome {
            table: table.to_string(),
            txid: a.txid,
            generation: a.generation,
            coordinator: a.coordinator.clone(),
            fence: true,
        };
        let deadline = self.cfg.timeouts.connect;
        let member = |n: &str| a.nodes.iter().any(|m| m == n);
        let mut heard = Vec::new();
        let from_coordinator = if a.coordinator == self.cfg.node {
            self.outcome(table, a.txid, a.generation, true, true)
                .await
                .ok()
        } else if let Some(n) = self.cfg.node_by_name(&a.coordinator) {
            match ask(&cluster.connect(n).await, &q, deadline).await {
                Ok(Response::Outcome(x)) => Some(x),
                _ => None,
            }
        } else {
            None
        };
        if let Some(x) = from_coordinator {
            heard.push(Heard {
                node: a.coordinator.clone(),
                member: member(&a.coordinator),
                coordinator: true,
                answer: x,
            });
        }
        let mut verdict = resolve(&heard);
        if verdict.is_none() && age > self.cfg.timeouts.in_doubt.as_millis() as u64 / 2 {
            // The transaction's own node list: this node's idea of who is in service may
            // differ from the coordinator's.
            let peers: Vec<_> = a
                .nodes
                .iter()
                .filter(|n| **n != self.cfg.node && **n != a.coordinator)
                .filter_map(|n| self.cfg.node_by_name(n))
                .cloned()
                .collect();
            for n in peers {
                if let Ok(Response::Outcome(x)) =
                    ask(&cluster.connect(&n).await, &q, deadline).await
                {
                    heard.push(Heard {
                        node: n.name.clone(),
                        member: true,
                        coordinator: false,
                        answer: x,
                    });
                    verdict = resolve(&heard);
                    if verdict.is_some() {
                        info!(txid = %a.txid, peer = %n.name, answer = %x, "cooperative termination");
                        break;
                    }
                }
            }
        }
        let event = match verdict {
            Some(Verdict::Commit) => Event::Commit {
                txid: a.txid,
                generation: a.generation,
            },
            Some(Verdict::Abort) => Event::Abort {
                txid: a.txid,
                generation: a.generation,
            },
            None => return,
        };
        info!(%table, txid = %a.txid, %event, age_ms = age, "resolving an in-doubt transaction");
        let resp = self.decide(table, event, None).await;
        debug!(%resp, "resolved");
    }
}
