//! The Sympa hook's side of `txmapd`: the local Unix socket `txmap-sympa` talks to, and the
//! requests it queues while the daemon is down.

use crate::server::{Node, HEADER_TIMEOUT};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use txmap_common::codec;
use txmap_common::config::Config;
use txmap_common::decision::DecisionLog;
use txmap_common::now_ms;
use txmap_coordinator::cluster::Cluster;

impl Node {
    /// Serves `txmap-sympa` on the local Unix socket: each request distributes one configured
    /// table, read from its configured source (the hook can name a table, never supply content).
    pub(crate) async fn hook_loop(self: Arc<Self>, cluster: Arc<Cluster>) {
        let h = &self.cfg.hook;
        if let Err(e) = prepare_socket_dir(&self.cfg) {
            warn!(error = %e, "cannot set up the hook's request directory");
        }
        if let Ok(m) = std::fs::symlink_metadata(&h.socket) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&h.socket);
            }
        }
        let listener = match tokio::net::UnixListener::bind(&h.socket) {
            Ok(l) => l,
            Err(e) => {
                warn!(socket = %h.socket.display(), error = %e, "cannot listen on the hook socket; txmap-sympa will queue requests");
                return;
            }
        };
        if let Err(e) = set_mode_and_group(&h.socket, h.mode, h.group.as_deref()) {
            warn!(socket = %h.socket.display(), error = %e, "cannot set the hook socket's permissions");
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let node = self.clone();
            let cluster = cluster.clone();
            tokio::spawn(async move { node.hook_request(stream, &cluster).await });
        }
    }

    async fn hook_request(&self, mut stream: tokio::net::UnixStream, cluster: &Cluster) {
        use txmap_common::proto::{LocalRequest, LocalResponse};
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let req = match tokio::time::timeout(
            HEADER_TIMEOUT,
            codec::read_frame::<_, LocalRequest>(&mut stream),
        )
        .await
        {
            Ok(Ok(r)) => r,
            _ => return,
        };
        let LocalRequest::Distribute { source } = req;
        let resp = match self.cfg.table_by_source(std::path::Path::new(&source)) {
            None => LocalResponse::Refused {
                detail: format!(
                    "no table in {} has source {source}",
                    self.cfg.file.display()
                ),
            },
            Some(t) => {
                info!(table = %t.name, ?uid, "distribution requested by the Sympa hook");
                let src = t.source.clone().unwrap_or_default();
                let r = txmap_coordinator::commit::commit_tracked(cluster, &t.name, &src).await;
                // Only now: until here the queued request covered a crash of this daemon; from
                // here the pending record (if the commit failed) covers the retries.
                let queued = txmap_common::config::HookSettings::requests_dir(&self.cfg.state_dir)
                    .join(&t.name);
                let _ = std::fs::remove_file(queued);
                LocalResponse::Done {
                    table: t.name.clone(),
                    exit: r.exit,
                    lines: r
                        .nodes
                        .iter()
                        .map(|n| format!("{}: {}", n.node, n.detail))
                        .collect(),
                }
            }
        };
        let _ = codec::write_frame(&mut stream, &resp).await;
    }

    /// Turns requests queued by `txmap-sympa` while this daemon was down into pending commits.
    pub(crate) fn adopt_queued_requests(&self) {
        let dir = txmap_common::config::HookSettings::requests_dir(&self.cfg.state_dir);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let log = DecisionLog::new(&self.cfg.state_dir);
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(t) = self.cfg.table(&name) else {
                continue;
            };
            // A fresh request is being served through the socket right now.
            let fresh = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                < Some(Duration::from_secs(3));
            if fresh {
                continue;
            }
            let _ = std::fs::remove_file(e.path());
            let Some(source) = t.source.clone() else {
                continue;
            };
            if log.pending(&name).is_none() {
                info!(table = %name, "adopting a distribution request queued while txmapd was down");
                let rec = txmap_common::decision::PendingRecord {
                    table: name.clone(),
                    source,
                    since_ms: now_ms(),
                    attempts: 0,
                    last_error: "queued by txmap-sympa while txmapd was down".into(),
                    next_ms: 0,
                    owner_pid: None,
                };
                if let Err(e) = log.set_pending(&rec) {
                    warn!(error = %e, "cannot record the queued request");
                }
            }
        }
    }
}

/// Creates the hook's request directory, writable by the socket's group (sticky, like /tmp).
fn prepare_socket_dir(cfg: &Config) -> std::io::Result<()> {
    let dir = txmap_common::config::HookSettings::requests_dir(&cfg.state_dir);
    std::fs::create_dir_all(&dir)?;
    let m = cfg.hook.mode;
    // Whoever may write to the socket may drop a request: rw bits of the socket, plus x.
    let dir_mode = 0o1000 | m | ((m & 0o222) >> 1) | ((m & 0o444) >> 2);
    set_mode_and_group(&dir, dir_mode, cfg.hook.group.as_deref())
}

/// Sets permission bits and, when named, the group (looked up in /etc/group).
fn set_mode_and_group(
    path: &std::path::Path,
    mode: u32,
    group: Option<&str>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(g) = group {
        let gid = std::fs::read_to_string("/etc/group")?
            .lines()
            .find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(g))
                    .then(|| f.nth(1).and_then(|x| x.parse::<u32>().ok()))
                    .flatten()
            })
            .ok_or_else(|| std::io::Error::other(format!("group `{g}` not found in /etc/group")))?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
