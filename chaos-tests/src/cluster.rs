//! A sandbox cluster driven as an operator would: `txmap sandbox`, `txmapd`, `txmap`.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Paths of the built binaries.
#[derive(Debug)]
pub struct Bins {
    /// The coordinator CLI.
    pub txmap: PathBuf,
    /// The participant daemon.
    pub txmapd: PathBuf,
    /// The Sympa hook.
    pub txmap_sympa: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds (once per process) and returns the binaries, with failpoints compiled in; or, when
/// `TXMAP_BIN_DIR` is set, uses the binaries found there as they are (the benchmark does this).
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TXMAP_BIN_DIR") {
            let dir = PathBuf::from(dir);
            return Bins {
                txmap: dir.join("txmap"),
                txmapd: dir.join("txmapd"),
                txmap_sympa: dir.join("txmap-sympa"),
            };
        }
        let root = workspace_root();
        let target = root.join("target").join("chaos");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "-p",
                "txmap-participant",
                "-p",
                "txmap-coordinator",
                "--bins",
                "--features",
                "txmap-participant/failpoints,txmap-coordinator/failpoints",
                "--target-dir",
            ])
            .arg(&target)
            .status()
            .expect("cannot run cargo to build the txmap binaries");
        assert!(status.success(), "building the txmap binaries failed");
        let dir = target.join("debug");
        Bins {
            txmap: dir.join("txmap"),
            txmapd: dir.join("txmapd"),
            txmap_sympa: dir.join("txmap-sympa"),
        }
    })
}

/// Picks `n` consecutive UDP ports nobody uses, distinct across the tests of this process.
fn ports(n: u16) -> u16 {
    // Below Linux's ephemeral range (32768–60999): a client socket of any other process (a
    // `txmap` run, a test elsewhere on the machine) could otherwise take a node's port while
    // that node is down, and the node could not start again (seen in a 28-minute chaos run).
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 120) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(n + 1, Ordering::SeqCst);
        let free = (0..n).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/txmap-test-<name>-<random>`.
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "txmap-test-{name}-{}",
            txmap_common::proto::TxId::random()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TXMAP_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The table every sandbox has.
pub const TABLE: &str = "sympa_transport";

/// A running (or partly running) sandbox cluster.
#[derive(Debug)]
pub struct TestCluster {
    /// Root of the sandbox.
    pub dir: TempDir,
    /// Number of nodes.
    pub n: usize,
    /// UDP port of node1.
    pub base_port: u16,
    daemons: Vec<Option<Child>>,
    /// Read-only bind mounts to undo on drop.
    mounts: Vec<PathBuf>,
    /// Directories made immutable (`chattr +i`) to undo on drop.
    immutable: Vec<PathBuf>,
    /// The user every daemon runs as (None: the test's user); see [`daemon_user`].
    daemon_user: Option<String>,
    /// Per node, a command line the daemon is started through (e.g. a mount namespace).
    wrappers: Vec<Option<Vec<String>>>,
}

impl TestCluster {
    /// Writes a sandbox of `n` nodes and starts every daemon.
    pub fn start(name: &str, n: usize) -> Result<TestCluster> {
        let c = TestCluster::create(name, n)?;
        let mut c = c;
        for i in 1..=n {
            c.start_node(i)?;
        }
        Ok(c)
    }

    /// Writes a sandbox of `n` nodes without starting anything.
    pub fn create(name: &str, n: usize) -> Result<TestCluster> {
        let dir = TempDir::new(name);
        let base_port = ports(n as u16);
        let out = Command::new(&bins().txmap)
            .arg("sandbox")
            .arg(dir.0.join("sb"))
            .args([
                "--nodes",
                &n.to_string(),
                "--base-port",
                &base_port.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "txmap sandbox failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Tests replace whole contents as test data; the content guard's share is off here
        // (emptying a table is still refused), and the guard's own tests turn it back on
        // ([`TestCluster::set_shrink_percent`]).
        for i in 1..=n {
            let p = dir.0.join("sb").join(format!("node{i}")).join("txmap.toml");
            let text = std::fs::read_to_string(&p)?;
            std::fs::write(
                &p,
                crate::chaos::config_edit::set_key(&text, None, "max_shrink_percent", "100"),
            )?;
        }
        Ok(TestCluster {
            dir,
            n,
            base_port,
            daemons: (0..n).map(|_| None).collect(),
            mounts: Vec::new(),
            immutable: Vec::new(),
            daemon_user: daemon_user(),
            wrappers: (0..n).map(|_| None).collect(),
        })
    }

    /// The sandbox root.
    pub fn root(&self) -> PathBuf {
        self.dir.0.join("sb")
    }

    /// Node `i`'s directory (1-based).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.root().join(format!("node{i}"))
    }

    /// Node `i`'s config file.
    pub fn config(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("txmap.toml")
    }

    /// Node `i`'s table directory.
    pub fn table_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("postfix")
    }

    /// Node `i`'s live table source path.
    pub fn live(&self, i: usize) -> PathBuf {
        self.table_dir(i).join(TABLE)
    }

    /// The shared source that `commit` reads.
    pub fn source(&self) -> PathBuf {
        self.root().join("shared").join(TABLE)
    }

    /// Node `i`'s daemon log.
    pub fn log(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("txmapd.log")
    }

    /// Starts node `i`'s daemon with extra environment (e.g. `FAILPOINTS`) and waits until ready.
    pub fn start_node_with(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))?;
        let before = std::fs::read_to_string(self.log(i))
            .unwrap_or_default()
            .matches("txmapd ready")
            .count();
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(w) = &self.wrappers[i - 1] {
            argv.extend(w.iter().map(Into::into));
        }
        if let Some(user) = self.daemon_user.clone() {
            // Root may have created files there since (a test's setup); a read-only mount
            // over the table directory makes chown fail, which the daemon then reports.
            if let Err(e) = self.give_node_to(i, &user) {
                eprintln!("warning: node{i}: {e:#}");
            }
            argv.extend(setpriv_argv(&user).into_iter().map(Into::into));
        }
        argv.push(bins().txmapd.clone().into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(self.config(i))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd.env("TXMAP_LOG", "info,txmapd=debug")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawn txmapd")?;
        self.daemons[i - 1] = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
            if text.matches("txmapd ready").count() > before {
                return Ok(());
            }
            if let Some(c) = self.daemons[i - 1].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("txmapd of node{i} exited during start ({st}): {text}");
                }
            }
            if Instant::now() > until {
                bail!("txmapd of node{i} not ready after 20 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `i`'s daemon and waits until it is ready.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        self.start_node_with(i, &[])
    }

    /// Process id of node `i`'s daemon, if running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.daemons[i - 1].as_ref().map(|c| c.id())
    }

    /// Sends `sig` to node `i`'s daemon.
    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.daemons[i - 1] {
            signal_pid(c.id(), sig);
        }
    }

    /// SIGKILLs node `i`'s daemon and reaps it.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.daemons[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for node `i`'s daemon to exit by itself (e.g. a failpoint), up to `limit`.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(c) = self.daemons[i - 1].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.daemons[i - 1] = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Runs `txmap --config <node i> ARGS`.
    pub fn txmap(&self, i: usize, args: &[&str]) -> Output {
        self.txmap_with(i, args, &[])
    }

    /// Runs `txmap` with extra environment.
    pub fn txmap_with(&self, i: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.txmap_command();
        cmd.arg("--config")
            .arg(self.config(i))
            .args(args)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run txmap")
    }

    /// Spawns `txmap --config <node i> ARGS` without waiting.
    pub fn spawn_txmap(&self, i: usize, args: &[&str]) -> Child {
        self.spawn_txmap_with(i, args, &[])
    }

    /// Spawns `txmap` with extra environment, without waiting.
    pub fn spawn_txmap_with(&self, i: usize, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = self.txmap_command();
        cmd.arg("--config")
            .arg(self.config(i))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn txmap")
    }

    /// Writes the shared source.
    pub fn write_source(&self, content: &str) {
        let mut f = std::fs::File::create(self.source()).expect("write source");
        f.write_all(content.as_bytes()).expect("write source");
    }

    /// `txmap commit sympa_transport` through node `i`.
    pub fn commit(&self, i: usize) -> Output {
        self.txmap(i, &["commit", TABLE])
    }

    /// Parsed `txmap status --json` through node `i`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = self.txmap(i, &["status", TABLE, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// `(generation, sha256)` of the table on every node, per `status` (None: unreachable).
    pub fn generations(&self) -> Vec<Option<(u64, String)>> {
        let s = self.status(1);
        let empty = Vec::new();
        s.as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|n| {
                let t = n
                    .get("tables")?
                    .as_array()?
                    .iter()
                    .find(|t| t.get("table").and_then(|x| x.as_str()) == Some(TABLE))?;
                Some((
                    t.get("generation")?.as_u64()?,
                    t.get("sha256")?.as_str().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// `txmap commit --json` through node `i`: exit code and the parsed report.
    pub fn commit_json(&self, i: usize) -> (Option<i32>, serde_json::Value) {
        let out = self.txmap(i, &["commit", TABLE, "--json"]);
        (
            out.status.code(),
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Node `i`'s journal of the table, as JSON (Null when absent).
    pub fn journal(&self, i: usize) -> serde_json::Value {
        let p = self
            .node_dir(i)
            .join("state")
            .join("tables")
            .join(format!("{TABLE}.json"));
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// How transaction `txid` ended on node `i` per its journal: `Some("Committed")`,
    /// `Some("Aborted")`, or None when it is not remembered.
    pub fn outcome(&self, i: usize, txid: &str) -> Option<String> {
        let j = self.journal(i);
        let recent = j.get("recent")?.as_array()?;
        recent.iter().rev().find_map(|e| {
            let pair = e.as_array()?;
            if pair.first()?.as_str()? != txid {
                return None;
            }
            let o = pair.get(1)?;
            Some(if o.get("Committed").is_some() {
                "Committed".to_string()
            } else {
                o.as_str()?.to_string()
            })
        })
    }

    /// True when no node reports a transaction in progress (status through node `via`).
    pub fn nothing_in_progress(&self, via: usize) -> bool {
        let s = self.status(via);
        s.as_array().is_some_and(|nodes| {
            nodes.len() == self.n
                && nodes.iter().all(|n| {
                    n.get("reachable").and_then(|r| r.as_bool()) == Some(true)
                        && n.get("tables")
                            .and_then(|t| t.as_array())
                            .is_some_and(|ts| {
                                ts.iter()
                                    .all(|t| t.get("prepared").is_some_and(|p| p.is_null()))
                            })
                })
        })
    }

    /// Rewrites node `i`'s config with `f`.
    /// `txmap check` through node `i` as `nobody` when root (a monitoring user without key or
    /// write access), else as the test's user.
    pub fn check_as_nobody(&self, i: usize, extra: &[&str]) -> Output {
        let mut cmd = if is_root() {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(&bins().txmap);
            cmd
        } else {
            Command::new(&bins().txmap)
        };
        cmd.arg("--config")
            .arg(self.config(i))
            .arg("check")
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run txmap check")
    }

    /// Sets every node's `max_shrink_percent` (the content guard's share; 100 in a new test
    /// cluster). A running txmapd takes it on SIGHUP; `txmap` reads it at once.
    pub fn set_shrink_percent(&self, pct: u64) {
        for i in 1..=self.n {
            self.edit_config(i, |t| {
                crate::chaos::config_edit::set_key(&t, None, "max_shrink_percent", &pct.to_string())
            });
        }
    }

    pub fn edit_config(&self, i: usize, f: impl FnOnce(String) -> String) {
        let p = self.config(i);
        let text = std::fs::read_to_string(&p).expect("read config");
        std::fs::write(&p, f(text)).expect("write config");
    }

    /// Looks up `keys` in node `i`'s live table with the real `postmap -q -` (one process).
    /// Returns the value per key (None: not found).
    pub fn lookup(&self, i: usize, keys: &[String]) -> Result<Vec<Option<String>>> {
        postmap_query(&self.table_dir(i), &self.live(i), keys)
    }

    /// Staged files left in node `i`'s table directory.
    pub fn staged_files(&self, i: usize) -> Vec<PathBuf> {
        std::fs::read_dir(self.table_dir(i))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().contains(".txmap-"))
                    // A spare copy of the live `.db` (made once the table is idle) is neither
                    // staged nor visible to Postfix.
                    .filter(|p| !p.to_string_lossy().contains(".txmap-spare-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when nobody holds node `i`'s table lock.
    pub fn lock_free(&self, i: usize) -> bool {
        let p = txmap_common::table::lock_path(&self.node_dir(i).join("state"), TABLE);
        matches!(txmap_common::table::try_lock(&p), Ok(Some(_)))
    }

    /// Makes node `i`'s table directory unwritable: a read-only bind mount as root (root
    /// ignores permission bits), `chmod 555` otherwise. Undone by [`Self::make_writable`].
    pub fn make_unwritable(&mut self, i: usize) -> Result<()> {
        let d = self.table_dir(i);
        if is_root() {
            run_ok(Command::new("mount").arg("--bind").arg(&d).arg(&d))?;
            self.mounts.push(d.clone());
            run_ok(
                Command::new("mount")
                    .args(["-o", "remount,ro,bind"])
                    .arg(&d),
            )?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555))?;
        }
        Ok(())
    }

    /// Undoes [`Self::make_unwritable`].
    pub fn make_writable(&mut self, i: usize) -> Result<()> {
        let d = self.table_dir(i);
        if let Some(pos) = self.mounts.iter().position(|m| *m == d) {
            run_ok(Command::new("umount").arg(&d))?;
            self.mounts.remove(pos);
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// Mounts a small tmpfs over node `i`'s table directory (root only), copying what was there.
    pub fn mount_tmpfs(&mut self, i: usize, size: &str) -> Result<()> {
        let d = self.table_dir(i);
        let keep = self.dir.0.join(format!("keep{i}"));
        run_ok(Command::new("cp").arg("-a").arg(&d).arg(&keep))?;
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&d),
        )?;
        self.mounts.push(d.clone());
        run_ok(Command::new("sh").arg("-c").arg(format!(
            "cp -a '{}'/. '{}'/",
            keep.display(),
            d.display()
        )))?;
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for d in self.daemons.iter_mut().flatten() {
            signal_pid(d.id(), libc::SIGCONT);
            let _ = d.kill();
            let _ = d.wait();
        }
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for d in self.immutable.drain(..) {
            let _ = Command::new("chattr").arg("-i").arg(&d).status();
        }
    }
}

/// The user the daemons of new clusters run as: `TXMAP_TEST_DAEMON_USER` (e.g. `txmap-test`),
/// when set, non-empty and the tests run as root; None otherwise (they run as the test's user).
pub fn daemon_user() -> Option<String> {
    let u = std::env::var("TXMAP_TEST_DAEMON_USER").ok()?;
    (!u.is_empty() && is_root()).then_some(u)
}

/// Creates `user` (a system user with its own group, no home, no login shell) unless it exists,
/// and makes it a member of `nogroup` (the hook socket's group in `tests/privilege.rs`: only a
/// member may give the socket that group). Root only.
pub fn ensure_user(user: &str) -> Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !exists {
        let out = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
            .arg(user)
            .output()?;
        // Another test process may have created it meanwhile (exit 9: already exists).
        if !out.status.success() && out.status.code() != Some(9) {
            bail!("useradd {user}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let groups = Command::new("id").arg("-nG").arg(user).output()?;
    if !String::from_utf8_lossy(&groups.stdout)
        .split_whitespace()
        .any(|g| g == "nogroup")
    {
        run_ok(Command::new("usermod").args(["-aG", "nogroup"]).arg(user))?;
    }
    Ok(())
}

/// `setpriv` arguments that run what follows as `user`, with its group and its supplementary
/// groups (from /etc/group: no `/proc` needed).
fn setpriv_argv(user: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={user}"),
        format!("--regid={user}"),
        "--init-groups".into(),
    ]
}

/// Daemon-user and wrapper modes: txmapd run as a dedicated non-root user, or through a wrapper
/// command (a mount namespace whose `/proc` is empty).
impl TestCluster {
    /// The user this cluster's daemons run as (None: the test's user).
    pub fn daemon_user(&self) -> Option<&str> {
        self.daemon_user.as_deref()
    }

    /// Runs this cluster's daemons (started from now on) as `user` (None: as the test's user),
    /// whatever `TXMAP_TEST_DAEMON_USER` says. Root only.
    pub fn set_daemon_user(&mut self, user: Option<&str>) {
        self.daemon_user = user.map(str::to_string);
    }

    /// Starts node `i`'s daemon (from now on) as `WRAPPER... [setpriv ...] txmapd --config ...`;
    /// the wrapper must `exec` its arguments (the pid is the daemon's).
    pub fn set_wrapper(&mut self, i: usize, wrapper: Option<Vec<String>>) {
        self.wrappers[i - 1] = wrapper;
    }

    /// A wrapper that runs the daemon in a private mount namespace whose `/proc` is an empty
    /// tmpfs (as in a chroot or container without `/proc`). Root only.
    pub fn no_proc_wrapper() -> Vec<String> {
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m,mode=0555 none /proc && exec \"$@\"",
            "sh",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `txmap`, run as the daemons' user when they have one: the admin CLI writes in the state
    /// directory (decisions, pending records, snapshots), which must stay the daemon's.
    pub fn txmap_command(&self) -> Command {
        match &self.daemon_user {
            Some(user) => {
                let argv = setpriv_argv(user);
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]).arg(&bins().txmap);
                cmd
            }
            None => Command::new(&bins().txmap),
        }
    }

    /// Gives node `i`'s table directory, state directory and TLS directory (its key) to `user`,
    /// as in production (docs/sympa-postfix.md): txmapd then needs no root. Idempotent.
    pub fn give_node_to(&self, i: usize, user: &str) -> Result<()> {
        ensure_user(user)?;
        let owner = format!("{user}:{user}");
        // The hook's queued requests belong to the hook's caller (the `sympa` user) by design,
        // as in production: they keep their owner and group.
        let queued: Vec<(PathBuf, u32, u32)> =
            std::fs::read_dir(self.state_dir(i).join("requests"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    use std::os::unix::fs::MetadataExt;
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.uid(), m.gid()))
                })
                .collect();
        for d in [
            self.table_dir(i),
            self.state_dir(i),
            self.node_dir(i).join("tls"),
        ] {
            if d.exists() {
                run_ok(Command::new("chown").args(["-R", "-h", &owner]).arg(&d))?;
            }
        }
        for (p, uid, gid) in queued {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
        }
        Ok(())
    }
}

/// A process's exit code, stdout and stderr, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `cond` every 100 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY-free: read the effective uid from /proc instead of calling libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn signal_pid(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `postmap -c CONFDIR -q - hash:TABLE` over `keys`: the value of each key, in order.
pub fn postmap_query(confdir: &Path, table: &Path, keys: &[String]) -> Result<Vec<Option<String>>> {
    let mut child = Command::new("postmap")
        .arg("-c")
        .arg(confdir)
        .arg("-q")
        .arg("-")
        .arg(format!("hash:{}", table.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run postmap -q")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input: String = keys.iter().map(|k| format!("{k}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.stderr.is_empty() {
        bail!("postmap -q: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut found = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.split_once('\t') {
            found.insert(k.to_string(), v.to_string());
        }
    }
    Ok(keys
        .iter()
        .map(|k| found.get(&k.to_lowercase()).cloned())
        .collect())
}

/// A Sympa-like transport table: `n` lists, each `list<i>@<domain> sympa:list<i>@<domain>`.
pub fn transport_table(domain: &str, range: std::ops::Range<usize>) -> String {
    let mut s = String::from("# sympa_transport (generated for a test)\n");
    for i in range {
        s.push_str(&format!("list{i}@{domain}\tsympa:list{i}@{domain}\n"));
    }
    s
}

/// Helpers for the atomicity tests (`tests/atomicity.rs`): config edits, storage faults,
/// raw requests, and what each node's state directory says about one transaction.
impl TestCluster {
    /// Writes a sandbox of `n` nodes, rewrites every node's config with `edit(i, text)`, then
    /// starts every daemon.
    pub fn start_edited(
        name: &str,
        n: usize,
        edit: impl Fn(usize, String) -> String,
    ) -> Result<TestCluster> {
        let mut c = TestCluster::create(name, n)?;
        for i in 1..=n {
            c.edit_config(i, |s| edit(i, s));
        }
        for i in 1..=n {
            c.start_node(i)?;
        }
        Ok(c)
    }

    /// Node `i`'s state directory.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("state")
    }

    /// Config text with node `k` marked `in_service = false` (the sandbox's own layout).
    pub fn out_of_service(&self, text: String, k: usize) -> String {
        let entry = format!(
            "name = \"node{k}\"\naddress = \"127.0.0.1:{}\"\n",
            self.base_port as usize + k - 1
        );
        assert!(text.contains(&entry), "node{k} not found in config");
        text.replace(&entry, &format!("{entry}in_service = false\n"))
    }

    /// The transaction holding the table on node `i` per its journal: `(txid, phase)`.
    pub fn active(&self, i: usize) -> Option<(String, String)> {
        let j = self.journal(i);
        let a = j.get("active")?;
        Some((
            a.get("txid")?.as_str()?.to_string(),
            a.get("phase")?.as_str()?.to_string(),
        ))
    }

    /// Node `i`'s live generation per its journal.
    pub fn journal_generation(&self, i: usize) -> u64 {
        self.journal(i)["generation"].as_u64().unwrap_or(0)
    }

    /// Every decision in node `i`'s decision log: `(txid, verdict)`.
    pub fn decisions(&self, i: usize) -> Vec<(String, String)> {
        let dir = self.state_dir(i).join("decisions");
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Ok(b) = std::fs::read(e.path()) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
                continue;
            };
            out.push((
                v["txid"].as_str().unwrap_or_default().to_string(),
                v["verdict"].as_str().unwrap_or_default().to_string(),
            ));
        }
        out
    }

    /// Makes node `i`'s table directory immutable (`chattr +i`, root only): any rename, create
    /// or unlink in it fails with EPERM. Undone by [`Self::make_mutable`] or on drop.
    pub fn make_immutable(&mut self, i: usize) -> Result<()> {
        let d = self.table_dir(i);
        run_ok(Command::new("chattr").arg("+i").arg(&d))?;
        self.immutable.push(d);
        Ok(())
    }

    /// Undoes [`Self::make_immutable`].
    pub fn make_mutable(&mut self, i: usize) -> Result<()> {
        let d = self.table_dir(i);
        run_ok(Command::new("chattr").arg("-i").arg(&d))?;
        self.immutable.retain(|x| *x != d);
        Ok(())
    }

    /// Sends `reqs`, one after the other, to node `to`'s daemon over QUIC with node `from`'s
    /// certificate (as that node's `txmap` or `txmapd` would), and returns the answers.
    pub fn send_as(
        &self,
        from: usize,
        to: usize,
        reqs: &[txmap_common::proto::Request],
    ) -> Result<Vec<txmap_common::proto::Response>> {
        let cfg = txmap_common::config::Config::load(&self.config(from))?;
        let client = txmap_common::tls::client_config(&cfg)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            ep.set_default_client_config(client);
            let n = cfg
                .nodes
                .iter()
                .find(|n| n.name == format!("node{to}"))
                .context("no such node")?;
            let conn =
                tokio::time::timeout(Duration::from_secs(3), ep.connect(n.address, &n.name)?)
                    .await
                    .context("connect timed out")??;
            let mut out = Vec::new();
            for r in reqs {
                let resp = tokio::time::timeout(
                    Duration::from_secs(5),
                    txmap_common::net::exchange::<tokio::fs::File>(&conn, r, None),
                )
                .await
                .context("no answer")??;
                out.push(resp);
            }
            conn.close(quinn::VarInt::from_u32(0), b"done");
            let _ = tokio::time::timeout(Duration::from_millis(50), ep.wait_idle()).await;
            Ok(out)
        })
    }

    /// Starts sampling the journal of [`TABLE`] on nodes 1 to `n` (every 20 ms), for
    /// [`JournalWatch::split_outcomes`].
    pub fn watch_journals(&self, n: usize) -> JournalWatch {
        let clock = crate::invariants::Clock::start();
        JournalWatch {
            sampler: Some(crate::invariants::journal::Sampler::start(
                (1..=n).map(|i| self.state_dir(i)).collect(),
                TABLE,
                clock,
                Duration::from_millis(20),
            )),
            clock,
        }
    }
}

/// Every node's journal, sampled over a whole test (a journal forgets outcomes, so one read at
/// the end could miss a split): the chaos runner's [`crate::invariants::journal::Sampler`].
#[derive(Debug)]
pub struct JournalWatch {
    sampler: Option<crate::invariants::journal::Sampler>,
    clock: crate::invariants::Clock,
}

impl JournalWatch {
    /// Stops sampling and applies the chaos runner's agreement rule ("one outcome per
    /// transaction", [`crate::invariants::aborted`]) to everything seen, plus each node's
    /// history: the violations, each naming its transaction and the nodes.
    pub fn split_outcomes(mut self) -> Vec<String> {
        let end = self.clock.ms();
        let Some(sampler) = self.sampler.take() else {
            return Vec::new();
        };
        let log = sampler.stop();
        let seen = crate::invariants::visibility::VisibilityResult {
            tally: Default::default(),
            served: Vec::new(),
            rounds: 0,
            slowest_ms: 0,
        };
        let versions = crate::invariants::Versions::default();
        crate::invariants::aborted::check(&[], &log, &seen, &versions, end)
            .violations
            .into_iter()
            .map(|v| v.detail)
            .collect()
    }
}

impl Drop for JournalWatch {
    /// Stops the sampling thread (a test that failed early must not leave it recreating the
    /// state directories of a removed sandbox).
    fn drop(&mut self) {
        if let Some(s) = self.sampler.take() {
            let _ = s.stop();
        }
    }
}
