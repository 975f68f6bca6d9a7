//! Talking to every node: connections, one exchange per node in parallel, with deadlines.

use std::future::Future;
use std::time::Duration;
use txmap_common::config::{Config, NodeConfig};
use txmap_common::net;
use txmap_common::proto::{Request, Response};
use txmap_common::tls::HandshakeFailure;

/// A QUIC client endpoint with this node's identity.
pub struct Cluster {
    /// This node's config.
    pub cfg: Config,
    endpoint: quinn::Endpoint,
    /// Connections kept open between commits (see [`Cluster::connect_warm`]).
    warm: std::sync::Mutex<std::collections::HashMap<String, quinn::Connection>>,
    /// Why [`Cluster::dial_early`] could not reach a node: the next [`Cluster::connect_warm`]
    /// to it answers this once instead of waiting for a second connect deadline.
    early_failures: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.cfg.node)
            .finish()
    }
}

/// A connection to one node, or why there is none.
pub type Link = Result<quinn::Connection, String>;

impl Cluster {
    /// Sets up the endpoint (this node's certificate as client identity).
    pub fn new(cfg: Config) -> anyhow::Result<Cluster> {
        let client = txmap_common::tls::client_config(&cfg)?;
        let any: std::net::SocketAddr = if cfg.nodes.iter().all(|n| n.address.is_ipv4()) {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let mut endpoint = quinn::Endpoint::client(any)?;
        endpoint.set_default_client_config(client);
        Ok(Cluster {
            cfg,
            endpoint,
            warm: Default::default(),
            early_failures: Default::default(),
        })
    }

    /// Connects to one node within the connect deadline.
    pub async fn connect(&self, node: &NodeConfig) -> Link {
        self.connect_within(node, self.cfg.timeouts.connect).await
    }

    /// Connects to one node within `limit` (capped by the connect deadline).
    pub async fn connect_within(&self, node: &NodeConfig, limit: Duration) -> Link {
        let limit = limit.min(self.cfg.timeouts.connect);
        let connecting = self
            .endpoint
            .connect(node.address, &node.name)
            .map_err(|e| format!("cannot connect to {}: {e}", node.address))?;
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(match txmap_common::tls::classify_handshake(&e) {
                HandshakeFailure::Refused(why) => format!(
                    "TLS refused at {}: this node refused its certificate: {why}",
                    node.address
                ),
                f @ HandshakeFailure::RefusedByPeer(_) => {
                    format!("TLS refused at {}: {f}", node.address)
                }
                HandshakeFailure::GaveUp(_) => format!("unreachable at {}: {e}", node.address),
            }),
            Err(_) => Err(format!(
                "unreachable at {}: no answer within {} ms",
                node.address,
                limit.as_millis()
            )),
        }
    }

    /// Connects to every node in parallel.
    /// A connection to `node` kept open between commits: the open one from an earlier call, or
    /// a new one (then kept). `txmapd` coordinates the Sympa hook's commits through one
    /// long-lived [`Cluster`], so a hook call pays no handshake; QUIC keep-alives hold the
    /// connections open, and a peer that went away closes them (idle timeout, or a stateless
    /// reset when it restarted), which makes the next call dial again.
    pub async fn connect_warm(&self, node: &NodeConfig, limit: Duration) -> Link {
        let open = |m: &std::collections::HashMap<String, quinn::Connection>| {
            m.get(&node.name)
                .filter(|c| c.close_reason().is_none())
                .cloned()
        };
        if let Some(c) = open(&self.warm.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(c);
        }
        let failed = self
            .early_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node.name);
        if let Some(why) = failed {
            return Err(why);
        }
        let link = self.connect_within(node, limit).await;
        if let Ok(c) = &link {
            self.warm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(node.name.clone(), c.clone());
        }
        link
    }

    /// Dials every in-service node now (within the connect deadline), so that a command's
    /// handshakes overlap its local work (`txmap commit` reads and snapshots the source
    /// meanwhile); the next [`Cluster::connect_warm`] to each node takes the result.
    pub async fn dial_early(&self) {
        let nodes = self.cfg.active_nodes();
        let links = join_all(
            nodes
                .iter()
                .map(|n| self.connect_warm(n, self.cfg.timeouts.connect)),
        )
        .await;
        let mut failed = self
            .early_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (n, l) in nodes.iter().zip(links) {
            if let Err(why) = l {
                failed.insert(n.name.clone(), why);
            }
        }
    }

    pub async fn connect_all(&self) -> Vec<(NodeConfig, Link)> {
        let nodes = self.cfg.nodes.clone();
        let links = join_all(nodes.iter().map(|n| self.connect(n))).await;
        nodes.into_iter().zip(links).collect()
    }

    /// Closes every connection politely.
    pub async fn close(&self) {
        // Send CONNECTION_CLOSE and give the driver a moment to put it on the wire (on
        // loopback under strace the frames leave within 0.6 ms; tokio's timer, of 1 ms
        // granularity, wakes 1 to 2 ms later); waiting for the full draining period (3 PTO)
        // would add tens of ms to every command for nothing: a participant that misses the
        // close frame drops the connection at its idle timeout.
        self.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(1), self.endpoint.wait_idle()).await;
    }
}

/// One request to one node with a deadline; any failure is a string naming the cause.
pub async fn ask(link: &Link, req: &Request, deadline: Duration) -> Result<Response, String> {
    let conn = link.as_ref().map_err(|e| e.clone())?;
    match tokio::time::timeout(deadline, net::exchange::<tokio::fs::File>(conn, req, None)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
    }
}

/// Runs futures concurrently and returns their outputs in order.
pub async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    // Poll all together: spawn-free, so borrowed data stays usable.
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}
