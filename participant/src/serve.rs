//! The network side of txmapd: QUIC connections, one request per stream, and the read-only
//! requests (status, fetch, verify).

use crate::server::{Node, HEADER_TIMEOUT};
use std::sync::Arc;
use tracing::{debug, info_span, warn, Instrument};
use txmap_common::codec;
use txmap_common::decision::DecisionLog;
use txmap_common::history::History;
use txmap_common::machine::Event;
use txmap_common::proto::{PendingInfo, Refusal, Request, Response, Sha256};
use txmap_common::table;

/// Refusals already logged: a peer that keeps trying is logged once an hour, not per attempt.
static REFUSALS: std::sync::LazyLock<txmap_common::tls::RefusalLog> =
    std::sync::LazyLock::new(Default::default);

/// Logs a refusal once (then once per quiet period, with how many were not logged).
fn log_refusal(who: &str, peer: &str, what: &str, reason: &str) {
    match REFUSALS.note(who, reason) {
        None => {}
        Some(0) => warn!(%peer, "{what}: {reason}"),
        Some(n) => warn!(%peer, "{what}: {reason} ({n} more since the last report)"),
    }
}

/// The request's name, for logs.
fn request_kind(req: &Request) -> &'static str {
    match req {
        Request::Status { .. } => "status",
        Request::Prepare(_) => "prepare",
        Request::PrepareDelta(_) => "delta prepare",
        Request::Commit { .. } => "commit",
        Request::Abort { .. } => "abort",
        Request::History { .. } => "history",
        Request::Fetch { .. } => "fetch",
        Request::Verify { .. } => "verify",
        Request::Outcome { .. } => "outcome",
    }
}

impl Node {
    pub(crate) async fn connection(live: Arc<crate::server::Live>, incoming: quinn::Incoming) {
        use txmap_common::tls::{classify_handshake, HandshakeFailure};
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                match classify_handshake(&e) {
                    // A client that gave up (a node resuming after a pause finds many): no alarm.
                    HandshakeFailure::GaveUp(why) => {
                        debug!(%remote, reason = %why, "handshake not completed")
                    }
                    HandshakeFailure::Refused(why) => {
                        let who = remote.ip().to_string();
                        log_refusal(&who, &remote.to_string(), "refused connection", &why);
                    }
                    f @ HandshakeFailure::RefusedByPeer(_) => {
                        let who = remote.ip().to_string();
                        log_refusal(
                            &who,
                            &remote.to_string(),
                            "connection failed",
                            &f.to_string(),
                        );
                    }
                }
                return;
            }
        };
        let Some(peer) = txmap_common::tls::peer_node(&conn, &live.node().cfg) else {
            let who = remote.ip().to_string();
            let why = "its certificate names no configured node";
            log_refusal(&who, &remote.to_string(), "refused connection", why);
            conn.close(quinn::VarInt::from_u32(1), b"not a configured node");
            return;
        };
        debug!(%remote, %peer, "connection");
        while let Ok((send, recv)) = conn.accept_bi().await {
            // The node current when the request arrives (a reload may have swapped it).
            let node = live.node();
            let peer = peer.clone();
            tokio::spawn(async move { node.stream(peer, send, recv).await });
        }
    }

    pub(crate) async fn stream(
        self: Arc<Self>,
        peer: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let req =
            match tokio::time::timeout(HEADER_TIMEOUT, codec::read_frame::<_, Request>(&mut recv))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, "bad request");
                    let _ = recv.stop(quinn::VarInt::from_u32(2));
                    self.reply(
                        &mut send,
                        Response::Refused(Refusal::Protocol {
                            detail: e.to_string(),
                        }),
                    )
                    .await;
                    return;
                }
                Err(_) => {
                    warn!(%peer, "request header timed out");
                    return;
                }
            };
        let what = request_kind(&req);
        let resp = match req {
            Request::Status { table } => self.status(table.as_deref()).await,
            Request::Prepare(p) => {
                let span =
                    info_span!("prepare", txid = %p.txid, table = %p.table, node = %self.cfg.node);
                self.prepare(&peer, p, None, &mut recv)
                    .instrument(span)
                    .await
            }
            Request::PrepareDelta(d) => {
                let p = d.prepare;
                let span = info_span!("prepare", txid = %p.txid, table = %p.table, node = %self.cfg.node, delta = d.delta_len);
                let delta = Some((d.base_sha256, d.delta_len));
                self.prepare(&peer, p, delta, &mut recv)
                    .instrument(span)
                    .await
            }
            Request::Commit {
                table,
                txid,
                generation,
            } => {
                let span = info_span!("commit", %txid, %table, node = %self.cfg.node);
                self.decide(&table, Event::Commit { txid, generation }, Some(&peer))
                    .instrument(span)
                    .await
            }
            Request::Abort {
                table,
                txid,
                generation,
            } => {
                let span = info_span!("abort", %txid, %table, node = %self.cfg.node);
                self.decide(&table, Event::Abort { txid, generation }, Some(&peer))
                    .instrument(span)
                    .await
            }
            Request::History { table } => match self.slot(&table) {
                Ok(_) => Response::History(History::new(&self.cfg.state_dir, &table).list()),
                Err(r) => r,
            },
            Request::Fetch { table, generation } => {
                self.fetch(&table, generation, &mut send).await;
                return;
            }
            Request::Verify { table } => self.verify(&table).await,
            Request::Outcome {
                table,
                txid,
                generation,
                coordinator,
                fence,
            } => {
                let mine = coordinator == self.cfg.node;
                // Only an in-service node may make this node fence (an out-of-service node
                // takes no part in transactions; its questions are answered, never acted on).
                let fence = fence && self.cfg.node_by_name(&peer).is_some_and(|n| n.in_service);
                match self.outcome(&table, txid, generation, mine, fence).await {
                    Ok(a) => Response::Outcome(a),
                    Err(r) => r,
                }
            }
        };
        if let Response::Refused(Refusal::NotAuthorized { detail }) = &resp {
            log_refusal(
                &peer,
                &peer,
                &format!("refused {what}: not authorized"),
                detail,
            );
        }
        self.reply(&mut send, resp).await;
    }

    pub(crate) async fn reply(&self, send: &mut quinn::SendStream, resp: Response) {
        if let Err(e) = codec::write_frame(send, &resp).await {
            debug!(error = %e, "could not send reply");
        }
        let _ = send.finish();
    }

    pub(crate) async fn status(&self, table: Option<&str>) -> Response {
        let mut names: Vec<&String> = match table {
            Some(t) => match self.slots.get_key_value(t) {
                Some((k, _)) => vec![k],
                None => {
                    return Response::Refused(Refusal::UnknownTable {
                        table: t.to_string(),
                    })
                }
            },
            None => self.slots.keys().collect(),
        };
        names.sort();
        let log = DecisionLog::new(&self.cfg.state_dir);
        let mut out = Vec::new();
        for n in names {
            let slot = &self.slots[n];
            let mut st = {
                let state = slot.state.lock().await;
                let mut st = state.status(n);
                // Drift is state: two `lstat`s against the stamps recorded at install, under
                // the table's lock (an install changes files and stamps together). A decided
                // commit whose install is retried has renamed some files already: not drift.
                let installing = st.prepared.as_ref().is_some_and(|p| p.installing);
                if !installing {
                    st.drifted = table::drift(&slot.table, state.source_stamp, state.indexed_stamp);
                }
                st
            };
            st.cleanup = slot.cleanup.info(&slot.table);
            st.pending = log.pending(n).map(|p| PendingInfo {
                since_ms: p.since_ms,
                attempts: p.attempts,
                last_error: p.last_error,
            });
            out.push(st);
        }
        Response::Status(out)
    }

    /// Streams the source of one generation from history.
    pub(crate) async fn fetch(&self, table: &str, generation: u64, send: &mut quinn::SendStream) {
        let path = match self.slot(table) {
            Err(r) => {
                self.reply(send, r).await;
                return;
            }
            Ok(_) => History::new(&self.cfg.state_dir, table).source(generation),
        };
        let Some(path) = path else {
            let r = Response::Refused(Refusal::Storage {
                op: "history".into(),
                path: table.to_string(),
                error: format!("generation {generation} is not in this node's history"),
            });
            self.reply(send, r).await;
            return;
        };
        let digest = match table::digest_file(&path) {
            Ok(d) => d,
            Err(e) => {
                self.reply(send, Response::Refused(e.into())).await;
                return;
            }
        };
        let header = Response::Source {
            len: digest.len,
            sha256: Sha256(digest.sha256),
        };
        if codec::write_frame(send, &header).await.is_err() {
            return;
        }
        let Ok(mut f) = tokio::fs::File::open(&path).await else {
            return;
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            use tokio::io::AsyncReadExt;
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send.finish();
    }

    /// Checks the live files against the recorded generation.
    pub(crate) async fn verify(&self, table: &str) -> Response {
        let slot = match self.slot(table) {
            Ok(s) => s.clone(),
            Err(r) => return r,
        };
        let (generation, sha) = {
            let st = slot.state.lock().await;
            (st.generation, st.sha256.map(|s| s.0))
        };
        let problems = table::verify_live(&self.cfg.postfix, &slot.table, sha).await;
        Response::Verified {
            generation,
            problems,
        }
    }
}
