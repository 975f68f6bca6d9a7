//! The Sympa hook's side of `txmapd`: the local Unix socket `txmap-sympa` talks to, and the
//! requests it queues while the daemon is down.
//!
//! # Least privilege
//!
//! `txmapd` never opens a path that the `sympa` user (or any other user) controls. The hook
//! reads the table's source itself, with its caller's rights, and sends the **content** over
//! the socket; the daemon bounds it (`max_table_bytes`, and a time limit), writes it to a
//! private snapshot (`<state_dir>/snapshots/<table>`, 0600 in a 0700 directory) off the async
//! runtime, and commits that snapshot. A failed commit stays pending on the snapshot, so every
//! retry uses the newest content the hook sent, never the user's file.
//!
//! Requests that arrive for a table while its commit runs are served together by the next
//! commit, with the newest content (one transaction, not one each).
//!
//! # No request lost
//!
//! Each request is also queued by the hook as a file of its own (`requests/<table>@<order>`,
//! see [`txmap_common::requests`]) before it is sent. The daemon removes a request's file, and
//! the older ones of its table, only once the commit that carried its content (or a later
//! one) is served everywhere or recorded as pending on a snapshot holding it, and only after
//! publishing that order as `<table>@seen`. A crash at any point leaves the files of every
//! request not yet covered, and the newest of them is distributed when the daemon runs again.
//! A change takes its count ([`txmap_common::proto::Change`]) when the daemon accepts it.
//!
//! The socket serves at most [`MAX_CONNECTIONS`] connections at once (the rest wait in the
//! kernel's backlog), reads each request within [`HEADER_TIMEOUT`], and backs off when
//! `accept` fails (file descriptors exhausted) instead of spinning.

use crate::server::{Node, HEADER_TIMEOUT};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use txmap_common::codec;
use txmap_common::config::{Config, HookSettings};
use txmap_common::decision::DecisionLog;
use txmap_common::now_ms;
use txmap_common::proto::{LocalRequest, LocalResponse, TxId, QUEUED_REQUEST_MAGIC};
use txmap_common::table::{self, Snapshots};
use txmap_coordinator::cluster::Cluster;

/// Hook connections served at once; more wait in the listen backlog.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Serializes snapshot installs between socket requests and adopted queued requests.
static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Tables with a hook request being served through the socket right now: their queued copy
/// (`requests/<table>`) is that request's, removed when it is done, never adopted meanwhile.
static SERVING: std::sync::Mutex<Option<HashMap<String, usize>>> = std::sync::Mutex::new(None);

/// Marks a table as served through the socket for as long as it lives.
struct Serving(String);

impl Serving {
    fn start(table: &str) -> Serving {
        let mut m = SERVING.lock().unwrap_or_else(|e| e.into_inner());
        *m.get_or_insert_with(HashMap::new)
            .entry(table.to_string())
            .or_default() += 1;
        Serving(table.to_string())
    }
    fn active(table: &str) -> bool {
        let m = SERVING.lock().unwrap_or_else(|e| e.into_inner());
        m.as_ref()
            .and_then(|m| m.get(table))
            .is_some_and(|n| *n > 0)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut m = SERVING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.as_mut().and_then(|m| m.get_mut(&self.0)) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Per-table coalescing of hook requests.
#[derive(Debug, Default)]
struct HookState {
    tables: std::sync::Mutex<HashMap<String, Arc<TableQueue>>>,
}

#[derive(Debug, Default)]
struct TableQueue {
    /// The newest content received and not yet taken by a commit.
    latest: std::sync::Mutex<Latest>,
    /// Held while a commit of this table runs; the last commit's sequence number and result.
    run: tokio::sync::Mutex<Option<(u64, LocalResponse)>>,
}

#[derive(Debug, Default)]
struct Latest {
    seq: u64,
    temp: Option<Accepted>,
}

/// A request's content, accepted and not yet taken by a commit.
#[derive(Debug)]
struct Accepted {
    /// Its place among this daemon's requests for the table.
    seq: u64,
    /// Its temporary snapshot.
    temp: PathBuf,
    /// Its change of the table's source.
    change: txmap_common::proto::Change,
    /// The highest queue order among the requests it stands for.
    order: Option<u64>,
}

impl HookState {
    fn queue(&self, table: &str) -> Arc<TableQueue> {
        let mut m = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(table.to_string()).or_default().clone()
    }
}

/// A blocking reader that fails once `until` has passed, however the peer trickles bytes.
struct Deadlined<'a> {
    s: &'a std::os::unix::net::UnixStream,
    until: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not received in time",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        (&mut &*self.s).read(buf)
    }
}

impl Node {
    /// Serves `txmap-sympa` on the local Unix socket: each request carries the content of one
    /// configured table, read by the hook with its caller's rights.
    pub(crate) async fn hook_loop(live: Arc<crate::server::Live>) {
        let first = live.node();
        let h = &first.cfg.hook;
        let snaps = Snapshots::new(&first.cfg.state_dir);
        if let Err(e) = snaps.ensure() {
            warn!(dir = %snaps.dir().display(), error = %e, "cannot create the private snapshot directory");
        }
        snaps.remove_temps();
        if let Err(e) = prepare_socket_dir(&first.cfg) {
            warn!(error = %e, "cannot set up the hook's request directory");
        }
        let listener = match bind_socket(&h.socket, h.mode, h.group.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                warn!(socket = %h.socket.display(), error = %e, "cannot listen on the hook socket; txmap-sympa will queue requests");
                return;
            }
        };
        let state = Arc::new(HookState::default());
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = Duration::from_millis(10);
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(10);
                    // The node current when the request arrives (a reload may swap it).
                    let (node, cluster) = live.both();
                    let state = state.clone();
                    tokio::spawn(async move {
                        node.hook_request(stream, &cluster, &state).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Typically EMFILE: retrying at once would spin and starve everything else.
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "hook socket: accept failed; backing off");
                    drop(permit);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn hook_request(
        self: Arc<Self>,
        stream: tokio::net::UnixStream,
        cluster: &Cluster,
        state: &HookState,
    ) {
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let Ok(std_stream) = stream.into_std() else {
            return;
        };
        let node = self.clone();
        let received = tokio::task::spawn_blocking(move || {
            let r = node.receive(&std_stream);
            (std_stream, r)
        })
        .await;
        let Ok((std_stream, received)) = received else {
            return;
        };
        let resp = match received {
            Err(detail) => {
                warn!(uid = %uid_text(uid), %detail, "hook request refused");
                LocalResponse::Refused { detail }
            }
            Ok((table, source, temp, queued)) => {
                info!(%table, %source, uid = %uid_text(uid), ?queued, "distribution requested by the Sympa hook");
                let _serving = Serving::start(&table);
                self.distribute(cluster, state, &table, temp, queued).await
            }
        };
        if std_stream.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut stream) = tokio::net::UnixStream::from_std(std_stream) else {
            return;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            codec::write_frame(&mut stream, &resp),
        )
        .await;
    }

    /// Reads one request and its content (blocking; run off the runtime) into a temporary
    /// snapshot: the table's name, the path Sympa named, the temporary file.
    fn receive(
        &self,
        s: &std::os::unix::net::UnixStream,
    ) -> Result<(String, String, PathBuf, Option<u64>), String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let mut r = Deadlined {
            s,
            until: Instant::now() + HEADER_TIMEOUT,
        };
        let req: LocalRequest =
            codec::read_frame_blocking(&mut r).map_err(|e| format!("bad request: {e}"))?;
        let LocalRequest::Distribute {
            table,
            source,
            len,
            queued,
        } = req;
        let known = self.cfg.table(&table).is_some_and(|t| t.source.is_some());
        if !known {
            return Err(format!(
                "no table `{table}` with a source in {}",
                self.cfg.file.display()
            ));
        }
        let max = self.cfg.max_table_bytes;
        if len > max {
            return Err(format!(
                "{table}: {len} bytes, more than max_table_bytes = {max}"
            ));
        }
        let snaps = Snapshots::new(&self.cfg.state_dir);
        let (temp, f) = snaps
            .create_temp(&table)
            .map_err(|e| format!("cannot create a snapshot in {}: {e}", snaps.dir().display()))?;
        // Large reads and writes (`io::copy` moves 8 KiB at a time: 160 of each at 20,000
        // lines).
        let mut f = std::io::BufWriter::with_capacity(256 * 1024, f);
        let got = std::io::copy(
            &mut std::io::BufReader::with_capacity(256 * 1024, (&mut r).take(len)),
            &mut f,
        )
        .and_then(|n| {
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(n)
        });
        match got {
            Ok(n) if n == len => Ok((table, source, temp, queued)),
            Ok(n) => {
                let _ = std::fs::remove_file(&temp);
                Err(format!(
                    "{table}: incomplete request: {n} of {len} bytes received"
                ))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                Err(format!("{table}: content not received: {e}"))
            }
        }
    }

    /// Commits the newest content received for `table`, coalescing requests that wait.
    async fn distribute(
        &self,
        cluster: &Cluster,
        state: &HookState,
        table: &str,
        temp: PathBuf,
        queued: Option<u64>,
    ) -> LocalResponse {
        let q = state.queue(table);
        let log = DecisionLog::new(&self.cfg.state_dir);
        // The change takes its count as it is accepted: a later request counts later.
        let change = {
            let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
            log.next_change(table)
        };
        let change = match change {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return LocalResponse::Done {
                    table: table.to_string(),
                    exit: txmap_common::exit::LOCAL,
                    lines: vec![format!(
                        "{}: cannot count the change in {}: {e}; the request stays queued",
                        self.cfg.node,
                        self.cfg.state_dir.join("changes").display()
                    )],
                };
            }
        };
        let mine = {
            let mut l = q.latest.lock().unwrap_or_else(|e| e.into_inner());
            l.seq += 1;
            let seq = l.seq;
            let mut order = queued;
            if let Some(older) = l.temp.take() {
                // Replaced by this newer content: it stands for the older request too.
                let _ = std::fs::remove_file(&older.temp);
                order = order.max(older.order);
            }
            l.temp = Some(Accepted {
                seq,
                temp,
                change,
                order,
            });
            seq
        };
        let mut run = q.run.lock().await;
        if let Some((done, resp)) = run.as_ref() {
            if *done >= mine {
                debug!(%table, "served by a commit that included this request");
                return resp.clone();
            }
        }
        let taken = q
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .temp
            .take();
        let Some(a) = taken else {
            return LocalResponse::Refused {
                detail: format!("{table}: request lost (a bug); run the hook again"),
            };
        };
        let snaps = Snapshots::new(&self.cfg.state_dir);
        let src = {
            let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
            snaps.install(table, &a.temp)
        };
        let src = match src {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&a.temp);
                return LocalResponse::Refused {
                    detail: format!(
                        "{table}: cannot keep a snapshot: {e}; the request stays queued"
                    ),
                };
            }
        };
        let r = txmap_coordinator::commit::commit_tracked_with(
            cluster,
            table,
            &src,
            false,
            Some(a.change),
        )
        .await;
        // A crash here, before the queue is tidied (chaos and regression tests).
        fail::fail_point!("hook::after_commit");
        // Only now, and only when this content (or a later one of its source) is served or
        // durably pending: until here the queued requests covered a crash of this daemon.
        let covered = r.exit == txmap_common::exit::OK
            || log.pending_for(table, &src).is_some_and(|p| {
                p.change
                    .is_some_and(|c| c == a.change || c.supersedes(&a.change))
            });
        if covered {
            if let Some(order) = a.order {
                cover_requests(&self.cfg, table, order);
            }
        }
        let resp = LocalResponse::Done {
            table: table.to_string(),
            exit: r.exit,
            lines: r
                .nodes
                .iter()
                .map(|n| format!("{}: {}", n.node, n.detail))
                .collect(),
        };
        *run = Some((a.seq, resp.clone()));
        resp
    }

    /// Turns requests queued by `txmap-sympa` that no running request covers (queued while this
    /// daemon was down, or left by a crash) into a pending commit of a private snapshot of the
    /// newest one: of the requests of a table waiting, only the highest order is distributed
    /// (it holds the newest content of the source). A request file is opened where it is,
    /// without following links or blocking, and checked (regular, one link, bounded) off the
    /// runtime; one this daemon cannot read is left where it is, with a warning that says why.
    pub(crate) fn adopt_queued_requests(&self) {
        let snaps = Snapshots::new(&self.cfg.state_dir);
        self.repoint_legacy_pending(&snaps);
        let dir = HookSettings::requests_dir(&self.cfg.state_dir);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A hook's temporary file; one left by a killed hook goes after a minute.
                let age = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok());
                if age > Some(Duration::from_secs(60)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let Ok(owner) = std::fs::metadata(&dir).map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        else {
            return;
        };
        for t in self.cfg.tables.iter().filter(|t| t.source.is_some()) {
            let seen = txmap_common::requests::read_seen(&dir, &t.name, owner);
            let plan =
                txmap_common::requests::plan(&txmap_common::requests::queued(&dir, &t.name), seen);
            for q in &plan.remove {
                if !q.regular {
                    warn!(path = %q.path.display(), "not a regular file in the request queue (planted?); removing it, never following it");
                }
                remove_request(&q.path);
            }
            let Some(q) = plan.adopt else {
                continue;
            };
            // A request being served through the socket right now covers its own file; one
            // just queued is most likely on its way through the socket (only an economy: a
            // request adopted twice is distributed once, the second finds it served).
            let fresh = std::fs::symlink_metadata(&q.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(3));
            if Serving::active(&t.name) || fresh {
                continue;
            }
            if !ADOPTING
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.name.clone())
            {
                continue;
            }
            let cfg = self.cfg.clone();
            let name = t.name.clone();
            tokio::task::spawn_blocking(move || {
                adopt_one(&cfg, &name, &q);
                ADOPTING
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
            });
        }
    }

    /// A pending record left by an older txmap names the user's file: point it at this
    /// node's snapshot of the table, or drop it (txmapd never reads the user's file).
    fn repoint_legacy_pending(&self, snaps: &Snapshots) {
        let log = DecisionLog::new(&self.cfg.state_dir);
        for p in log.list_pending() {
            if snaps.holds(&p.source) {
                continue;
            }
            let snap = snaps.path(&p.table);
            if snap.is_file() {
                let rec = txmap_common::decision::PendingRecord {
                    source: snap,
                    ..p.clone()
                };
                let _ = log.set_pending(&rec);
            } else if p.owner_pid.is_none() {
                warn!(table = %p.table, source = %p.source.display(), "dropping a pending commit that names a file instead of a snapshot (left by an older txmap); run `txmap commit {}` or the hook again", p.table);
                log.clear_pending(&p.table, &p.source);
            }
        }
    }
}

/// Tables whose queued request is being adopted right now.
static ADOPTING: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Every request of `table` up to `order` is served or durably pending: publishes the mark,
/// then removes their files (the one at `order` only once the mark is published, so that the
/// hook's next order stays above it).
fn cover_requests(cfg: &Config, table: &str, order: u64) {
    let dir = HookSettings::requests_dir(&cfg.state_dir);
    let published = match txmap_common::requests::publish_seen(&dir, table, order) {
        Ok(()) => true,
        Err(e) => {
            warn!(%table, dir = %dir.display(), error = %e, "cannot publish the requests served or pending; the newest stays queued (it is not distributed twice: its content is pending or served)");
            false
        }
    };
    let queued = txmap_common::requests::queued(&dir, table);
    for q in txmap_common::requests::after_cover(&queued, order, published) {
        remove_request(&q.path);
    }
}

/// Removes a request's file (a failure is only logged: the published mark keeps it from ever
/// being distributed again, and the next pass removes it).
fn remove_request(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove a request already served; removed on a later pass");
        }
    }
}

/// Messages about request files this daemon cannot read, said once per file.
static UNREADABLE: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Takes one queued request's content into the table's snapshot and records a pending commit
/// of it, as a new change of the source; then every request of the table up to it is covered.
fn adopt_one(cfg: &Config, table_name: &str, q: &txmap_common::requests::Queued) {
    use std::os::unix::fs::MetadataExt;
    let snaps = Snapshots::new(&cfg.state_dir);
    let max = cfg.max_table_bytes + QUEUED_REQUEST_MAGIC.len() as u64;
    let opened = table::open_untrusted(&q.path, max);
    let (f, _) = match opened {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            if UNREADABLE
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(q.path.clone())
            {
                let m = std::fs::symlink_metadata(&q.path).ok();
                warn!(
                    path = %q.path.display(),
                    owner_uid = m.as_ref().map(|m| m.uid()),
                    group_gid = m.as_ref().map(|m| m.gid()),
                    mode = format!("{:o}", m.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0)),
                    "txmapd's user cannot read this queued request: it must be readable by the queue directory's group (txmap-sympa makes it so; is txmapd's user a member of the hook's group?). It is kept and tried again"
                );
            }
            return;
        }
        Err(e) => {
            warn!(path = %q.path.display(), error = %e, "queued request refused (not a plain file of at most max_table_bytes); set aside as .refused");
            set_aside(&q.path);
            return;
        }
    };
    let r = (|| -> std::io::Result<()> {
        let bytes = table::read_bounded(f, max)?;
        let Some(content) = bytes.strip_prefix(QUEUED_REQUEST_MAGIC) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "queued without its content (by an older txmap-sympa?); run the hook again",
            ));
        };
        let temp = snaps.write_temp(table_name, content)?;
        let log = DecisionLog::new(&cfg.state_dir);
        let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let change = log.next_change(table_name)?;
        let source = snaps.install(table_name, &temp)?;
        info!(table = %table_name, order = q.order, %change, "adopting a distribution request txmap-sympa queued (txmapd was down, or stopped before it was served)");
        let prev = log.pending_for(table_name, &source);
        let rec = txmap_common::decision::PendingRecord {
            table: table_name.to_string(),
            source,
            since_ms: prev.as_ref().map(|p| p.since_ms).unwrap_or_else(now_ms),
            attempts: 0,
            last_error: "queued by txmap-sympa, not yet distributed".into(),
            next_ms: 0,
            owner_pid: None,
            force: false,
            change: Some(change),
            held: None,
        };
        log.set_pending(&rec)
    })();
    match r {
        Ok(()) => cover_requests(cfg, table_name, q.order),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            warn!(table = %table_name, path = %q.path.display(), error = %e, "queued request refused; set aside as .refused");
            set_aside(&q.path);
        }
        // A storage error: the request stays queued and is tried again.
        Err(e) => {
            warn!(table = %table_name, path = %q.path.display(), error = %e, "cannot adopt a queued request yet; kept, tried again")
        }
    }
}

/// Renames a request that can never be distributed to `<name>.refused` (kept for the operator;
/// no longer a request name).
fn set_aside(path: &Path) {
    let mut to = path.as_os_str().to_owned();
    to.push(".refused");
    let _ = std::fs::rename(path, to);
}

/// Binds the hook socket without ever following a link: the socket is created in a fresh
/// private directory (0700) beside its final path, given its group and mode there (nobody else
/// can reach it), then renamed over the final path, which replaces whatever was there (a stale
/// socket, or a link someone planted) instead of following it.
pub(crate) fn bind_socket(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> std::io::Result<tokio::net::UnixListener> {
    let parent = path.parent().unwrap_or_else(|| Path::new("/"));
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(std::io::Error::other(format!(
            "{} is a directory",
            path.display()
        )));
    }
    // Short names: a socket path is limited to 107 bytes.
    let private = parent.join(format!(".s{:06x}", TxId::random().0 & 0xff_ffff));
    table::private_dir(&private)?;
    let tmp = private.join("s");
    let r = (|| {
        let l = tokio::net::UnixListener::bind(&tmp)?;
        set_mode_and_group(&tmp, mode, group)?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    r
}

/// Creates the hook's request directory, writable by the socket's group (sticky, like /tmp),
/// durable in the state directory (a request queued in it must survive a power cut). Its
/// owner and mode are set on an open descriptor (never through a link).
fn prepare_socket_dir(cfg: &Config) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = HookSettings::requests_dir(&cfg.state_dir);
    table::create_dir_durable(&dir, 0o700)?;
    let m = cfg.hook.mode;
    // Whoever may write to the socket may drop a request: rw bits of the socket, plus x.
    // Sticky (nobody removes another's request), setgid (a request belongs to the directory's
    // group, which txmapd's user reads it through).
    let dir_mode = 0o3000 | m | ((m & 0o222) >> 1) | ((m & 0o444) >> 2);
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(table::NOFOLLOW_DIRECTORY)
        .open(&dir)?;
    if let Some(g) = cfg.hook.group.as_deref() {
        std::os::unix::fs::fchown(&d, None, Some(group_id(g)?))?;
    }
    d.set_permissions(std::fs::Permissions::from_mode(dir_mode))
}

/// The id of group `g` (looked up in /etc/group).
fn group_id(g: &str) -> std::io::Result<u32> {
    std::fs::read_to_string("/etc/group")?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(g))
                .then(|| f.nth(1).and_then(|x| x.parse::<u32>().ok()))
                .flatten()
        })
        .ok_or_else(|| std::io::Error::other(format!("group `{g}` not found in /etc/group")))
}

/// Sets permission bits and, when named, the group, of a path inside a private directory
/// (`lchown`: a link is never followed).
fn set_mode_and_group(path: &Path, mode: u32, group: Option<&str>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(g) = group {
        std::os::unix::fs::lchown(path, None, Some(group_id(g)?))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The hook caller's uid for logs (`unknown` when the kernel did not tell).
fn uid_text(uid: Option<u32>) -> String {
    uid.map_or_else(|| "unknown".to_string(), |u| u.to_string())
}
