//! A throwaway Postfix for tests, and an SMTP prober that asks it about recipients.
//!
//! txmap's first promise is that "mail to an existing list is never refused". The only honest
//! judge of that is the real reader of the tables: Postfix's `smtpd(8)` (recipient validation)
//! and `trivial-rewrite(8)` (`transport_maps`). [`PostfixInstance`] runs one as
//! `/usr/lib/postfix/sbin/master -c CONFDIR -d` in the foreground, with its own config, queue,
//! data directory and log under a test directory, listening on `127.0.0.1:<free port>`; it is
//! killed, with every process it started, on drop. [`probe`] and [`ProbeLoop`] then ask it, over
//! plain SMTP, whether it would accept mail for a list.
//!
//! # Configuration (see [`main_cf`] and [`master_cf`])
//! - Sympa's *virtual domain setting* (its recommended Postfix integration): the list domain is
//!   a `virtual_mailbox_domains` domain, `sympa_transport` is both `transport_maps` (routing to
//!   the `sympa:` transport) and `virtual_mailbox_maps` (recipient validation), so `RCPT TO` a
//!   list that is not in the table gets `550 5.1.1 ... User unknown in virtual mailbox table`.
//!   Sympa lists the domain in `hash:transport.sympa`; here it is written literally, so the only
//!   tables are the ones under test.
//! - Sympa's *single domain setting*, for `sympa_aliases`: the alias domain is in
//!   `mydestination`, and `local_recipient_maps = $alias_maps` validates recipients against the
//!   alias tables only (not the passwd file).
//! - No process is chrooted (the tables live anywhere), every delivery transport (`sympa`,
//!   `local`, `virtual`, `smtp`, `relay`, ...) is `discard(8)`, so nothing can leave the machine.
//! - `in_flow_delay = 0`, `smtpd_error_sleep_time = 0` and high error limits, so a prober is never
//!   slowed down or disconnected by Postfix's anti-abuse measures; `smtpd_peername_lookup = no`.
//! - Everything else (process reuse, `ipc_idle`, table change detection, locking) is Postfix's
//!   default, since that is the behaviour under test. [`PostfixTables::extra`] overrides anything.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Postfix's master daemon (Debian's path).
pub const MASTER: &str = "/usr/lib/postfix/sbin/master";

/// The list domain of the default setup.
pub const LIST_DOMAIN: &str = "lists.example.org";

/// Postfix's unprivileged user (`mail_owner`).
const MAIL_OWNER: &str = "postfix";

/// Postfix's set-gid group (`setgid_group`).
const SETGID_GROUP: &str = "postdrop";

/// How long [`PostfixInstance::start`] waits for the first SMTP banner.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A Postfix lookup table: `type:path`, e.g. `hash:/etc/sympa/sympa_transport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    /// The map type: `hash`, `btree`, `cdb`, `lmdb`.
    pub kind: String,
    /// The source path (without the `.db`/`.cdb`/`.lmdb` suffix).
    pub path: PathBuf,
}

impl Map {
    /// A map of the given type.
    pub fn new(kind: &str, path: impl Into<PathBuf>) -> Map {
        Map {
            kind: kind.to_string(),
            path: path.into(),
        }
    }

    /// A `hash:` map (what Sympa's `aliases_db_type` defaults to).
    pub fn hash(path: impl Into<PathBuf>) -> Map {
        Map::new("hash", path)
    }

    /// The indexed file Postfix reads: `.db` for `hash`/`btree`, `.cdb`, `.lmdb`.
    pub fn indexed_path(&self) -> PathBuf {
        let suffix = match self.kind.as_str() {
            "hash" | "btree" => ".db",
            "cdb" => ".cdb",
            "lmdb" => ".lmdb",
            _ => "",
        };
        let mut s = self.path.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }
}

impl fmt::Display for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.path.display())
    }
}

/// The tables a [`PostfixInstance`] validates recipients against.
#[derive(Debug, Clone)]
pub struct PostfixTables {
    /// The virtual domain whose recipients must be in [`Self::transport`].
    pub domain: String,
    /// Transport tables (`sympa_transport`: `list@domain sympa:list@domain`), used as both
    /// `transport_maps` and `virtual_mailbox_maps`. Empty: no virtual domain at all.
    pub transport: Vec<Map>,
    /// The local domain whose recipients must be in [`Self::aliases`] (by local part).
    pub alias_domain: String,
    /// Alias tables (`sympa_aliases`, built by `postalias`): `alias_maps`. Empty: no local domain.
    pub aliases: Vec<Map>,
    /// Extra `main.cf` settings, written last (so they override the harness's).
    pub extra: Vec<(String, String)>,
}

impl Default for PostfixTables {
    fn default() -> Self {
        PostfixTables {
            domain: LIST_DOMAIN.to_string(),
            transport: Vec::new(),
            alias_domain: "aliases.example.org".to_string(),
            aliases: Vec::new(),
            extra: Vec::new(),
        }
    }
}

impl PostfixTables {
    /// Sympa's virtual domain setting with one `hash:` `sympa_transport` for [`LIST_DOMAIN`].
    pub fn sympa_transport(path: impl Into<PathBuf>) -> PostfixTables {
        PostfixTables::default().with_transport(Map::hash(path))
    }

    /// Adds a transport table.
    pub fn with_transport(mut self, map: Map) -> PostfixTables {
        self.transport.push(map);
        self
    }

    /// Adds an alias table.
    pub fn with_aliases(mut self, map: Map) -> PostfixTables {
        self.aliases.push(map);
        self
    }

    /// Adds (or overrides) a `main.cf` setting.
    pub fn with_setting(mut self, key: &str, value: &str) -> PostfixTables {
        self.extra.push((key.to_string(), value.to_string()));
        self
    }

    fn all(&self) -> impl Iterator<Item = &Map> {
        self.transport.iter().chain(self.aliases.iter())
    }
}

/// The lines of a Sympa-style transport table: `name@domain<TAB>sympa:name@domain` per name.
pub fn sympa_transport_text<I, S>(domain: &str, names: I) -> String
where
    I: IntoIterator<Item = S>,
    S: fmt::Display,
{
    let mut s = String::from("# sympa_transport (generated for a test)\n");
    for n in names {
        s.push_str(&format!("{n}@{domain}\tsympa:{n}@{domain}\n"));
    }
    s
}

/// Writes a minimal `main.cf` into `dir` (created if needed) for `postmap -c DIR`/`postalias -c
/// DIR`, which refuse to run without one (this machine has no `/etc/postfix/main.cf`). Returns
/// `dir`.
pub fn write_tool_config(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    write_config_file(
        &dir.join("main.cf"),
        "# for postmap/postalias -c in tests\n\
         compatibility_level = 3.6\n\
         myhostname = mx.txmap.test\n\
         mydomain = txmap.test\n",
    )?;
    Ok(dir.to_path_buf())
}

/// Writes a Postfix config file with an mtime a minute in the past. Postfix programs refuse to
/// read a `main.cf` modified within the last second: they poll it every 300 ms until it is
/// older, which costs about 2 s for a config written just before `master` or `postmap` runs.
fn write_config_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .with_context(|| format!("set the mtime of {}", path.display()))
}

/// `postmap -c CONFDIR TYPE:PATH`: rebuilds the indexed file **in place**, exactly as Sympa's
/// `aliases_program postmap` does. Any output on stderr is an error (postmap exits 0 on warnings).
pub fn postmap(conf_dir: &Path, map: &Map) -> Result<()> {
    run_builder("postmap", conf_dir, map)
}

/// `postalias -c CONFDIR TYPE:PATH`, in place.
pub fn postalias(conf_dir: &Path, map: &Map) -> Result<()> {
    run_builder("postalias", conf_dir, map)
}

fn run_builder(tool: &str, conf_dir: &Path, map: &Map) -> Result<()> {
    let out = Command::new(tool)
        .arg("-c")
        .arg(conf_dir)
        .arg(map.to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {tool}"))?;
    if !out.status.success() || !out.stderr.is_empty() {
        bail!(
            "{tool} {map} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why Postfix tests cannot run here (not root, no `master`), or None.
pub fn unavailable() -> Option<String> {
    if !crate::cluster::is_root() {
        return Some("the throwaway Postfix needs root (its daemons drop to `postfix`)".into());
    }
    if !Path::new(MASTER).exists() {
        return Some(format!("{MASTER} is missing (install Debian's postfix)"));
    }
    None
}

/// A running throwaway Postfix (`master -d`, foreground child). Dropping it stops every process
/// it started.
#[derive(Debug)]
pub struct PostfixInstance {
    dir: PathBuf,
    port: u16,
    master: Option<Child>,
    pgid: u32,
    started_in: Duration,
}

impl PostfixInstance {
    /// Writes a config for `tables` under `dir` (`conf/`, `queue/`, `data/`, `log/`), then starts
    /// `master -c DIR/conf -d` on a free port of 127.0.0.1 and waits for its SMTP banner.
    ///
    /// The indexed files of `tables` must exist (build them first): Postfix daemons die on a
    /// missing table.
    pub fn start(dir: &Path, tables: &PostfixTables) -> Result<PostfixInstance> {
        if let Some(why) = unavailable() {
            bail!("cannot start Postfix: {why}");
        }
        for m in tables.all() {
            let idx = m.indexed_path();
            if !idx.exists() {
                bail!(
                    "{} is missing: build {m} before starting Postfix",
                    idx.display()
                );
            }
        }
        if !tables.transport.is_empty()
            && !tables.aliases.is_empty()
            && tables.domain.eq_ignore_ascii_case(&tables.alias_domain)
        {
            bail!(
                "transport and alias tables need two different domains (Postfix cannot serve {} as both a virtual and a local domain)",
                tables.domain
            );
        }
        let t0 = Instant::now();
        let layout = Layout::create(dir)?;
        let mut last_err = None;
        // The port is chosen by binding port 0 and releasing it: another process may take it
        // before master binds it, so try a few.
        for _ in 0..5 {
            let port = free_port()?;
            layout.write_config(tables, port)?;
            match spawn_and_wait(&layout, port) {
                Ok((master, pgid)) => {
                    return Ok(PostfixInstance {
                        dir: dir.to_path_buf(),
                        port,
                        master: Some(master),
                        pgid,
                        started_in: t0.elapsed(),
                    })
                }
                Err(e) => {
                    // master's own fatal errors (before postlogd runs) go to syslog, which
                    // tests do not have: find out whether the port was the problem directly.
                    let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err();
                    last_err = Some(e);
                    if !busy {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("Postfix did not start")))
    }

    /// The SMTP address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The SMTP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The instance's `config_directory` (usable with `postmap -c`, `postconf -c`).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }

    /// The instance's `maillog_file`.
    pub fn maillog(&self) -> PathBuf {
        self.dir.join("log").join("postfix.log")
    }

    /// The maillog so far (empty when unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.maillog()).unwrap_or_default()
    }

    /// Lines of the maillog containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// How long [`Self::start`] took until the first banner.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The process group of the master and all its children.
    pub fn process_group(&self) -> u32 {
        self.pgid
    }

    /// The live (non-zombie) processes of the instance.
    pub fn processes(&self) -> Vec<u32> {
        processes_in_group(self.pgid)
    }

    /// Stops the instance: SIGTERM to master (which SIGTERMs its process group), then SIGKILL to
    /// whatever is left of the group, and waits until no process of it is alive. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut master) = self.master.take() else {
            return Ok(());
        };
        let pgid = self.pgid;
        signal(master.id(), "TERM");
        let until = Instant::now() + Duration::from_secs(3);
        let mut exited = false;
        while Instant::now() < until {
            // The master stays a zombie (holding its pid and so the group id) until reaped here.
            if let Ok(Some(_)) = master.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !exited {
            let _ = master.kill();
            let _ = master.wait();
        }
        // Children the master did not take down (it SIGTERMs its group on SIGTERM): by pid,
        // checking the group again just before each signal.
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            let left = processes_in_group(pgid);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("Postfix processes {left:?} of group {pgid} survived SIGKILL");
            }
            for pid in left {
                if process_group_of(pid) == Some(pgid) {
                    signal(pid, "KILL");
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("postfix harness: {e:#}");
        }
    }
}

/// The directories of one instance.
#[derive(Debug)]
struct Layout {
    conf: PathBuf,
    queue: PathBuf,
    data: PathBuf,
    log: PathBuf,
    master_out: PathBuf,
}

impl Layout {
    /// Creates the directories with the owners and modes `postfix set-permissions` would give
    /// them (from Debian's `postfix-files`): master and its daemons refuse to work otherwise.
    fn create(dir: &Path) -> Result<Layout> {
        let l = Layout {
            conf: dir.join("conf"),
            queue: dir.join("queue"),
            data: dir.join("data"),
            log: dir.join("log"),
            master_out: dir.join("master.out"),
        };
        let (uid, _) = user_ids(MAIL_OWNER)?;
        let gid = group_id(SETGID_GROUP)?;
        mkdir(&l.conf, 0o755, None)?;
        mkdir(&l.log, 0o755, None)?;
        mkdir(&l.queue, 0o755, None)?;
        mkdir(&l.data, 0o700, Some((uid, None)))?;
        mkdir(&l.queue.join("pid"), 0o755, None)?;
        for d in [
            "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
            "private", "saved", "trace",
        ] {
            mkdir(&l.queue.join(d), 0o700, Some((uid, None)))?;
        }
        mkdir(&l.queue.join("maildrop"), 0o730, Some((uid, Some(gid))))?;
        mkdir(&l.queue.join("public"), 0o710, Some((uid, Some(gid))))?;
        Ok(l)
    }

    fn write_config(&self, tables: &PostfixTables, port: u16) -> Result<()> {
        let main = main_cf(&self.queue, &self.data, &self.log, tables);
        write_config_file(&self.conf.join("main.cf"), &main)?;
        write_config_file(&self.conf.join("master.cf"), &master_cf(port))?;
        Ok(())
    }
}

/// The `main.cf` of an instance (see the module documentation for the reasons).
pub fn main_cf(queue: &Path, data: &Path, log: &Path, tables: &PostfixTables) -> String {
    let join = |maps: &[Map]| {
        maps.iter()
            .map(Map::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut kv: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| kv.push((k.to_string(), v));
    set("compatibility_level", "3.6".into());
    set("mail_owner", MAIL_OWNER.into());
    set("setgid_group", SETGID_GROUP.into());
    set("queue_directory", queue.display().to_string());
    set("data_directory", data.display().to_string());
    set("maillog_file_prefixes", log.display().to_string());
    set(
        "maillog_file",
        log.join("postfix.log").display().to_string(),
    );
    set("myhostname", "mx.txmap.test".into());
    set("mydomain", "txmap.test".into());
    set("myorigin", "$myhostname".into());
    set("inet_interfaces", "127.0.0.1".into());
    set("inet_protocols", "ipv4".into());
    set("mynetworks", "127.0.0.0/8".into());
    set("biff", "no".into());
    // Recipient validation.
    set(
        "smtpd_relay_restrictions",
        "reject_unauth_destination".into(),
    );
    set("smtpd_recipient_restrictions", String::new());
    set("smtpd_reject_unlisted_recipient", "yes".into());
    set("recipient_delimiter", "+".into());
    if tables.transport.is_empty() {
        set("virtual_mailbox_domains", String::new());
        set("virtual_mailbox_maps", String::new());
        set("transport_maps", String::new());
    } else {
        let t = join(&tables.transport);
        set("virtual_mailbox_domains", tables.domain.clone());
        set("virtual_mailbox_maps", t.clone());
        set("transport_maps", t);
    }
    if tables.aliases.is_empty() {
        set("mydestination", String::new());
        set("alias_maps", String::new());
        set("alias_database", String::new());
        set("local_recipient_maps", String::new());
    } else {
        let a = join(&tables.aliases);
        set("mydestination", tables.alias_domain.clone());
        set("alias_maps", a.clone());
        set("alias_database", a);
        set("local_recipient_maps", "$alias_maps".into());
    }
    // A prober must see Postfix's answers, not its throttling.
    set("in_flow_delay", "0".into());
    set("smtpd_error_sleep_time", "0".into());
    set("smtpd_soft_error_limit", "100000".into());
    set("smtpd_hard_error_limit", "100000".into());
    set("smtpd_junk_command_limit", "100000".into());
    set("smtpd_client_connection_count_limit", "0".into());
    set("smtpd_peername_lookup", "no".into());
    set("smtpd_banner", "$myhostname ESMTP txmap-test".into());
    for (k, v) in &tables.extra {
        set(k, v.clone());
    }
    let mut s = String::from("# throwaway Postfix for txmap tests (chaos-tests/src/postfix.rs)\n");
    for (k, v) in kv {
        s.push_str(&format!("{k} = {v}\n"));
    }
    s
}

/// The `master.cf` of an instance: smtpd on `127.0.0.1:port`, the internal services smtpd needs,
/// and `discard` behind every delivery transport. Nothing is chrooted.
pub fn master_cf(port: u16) -> String {
    let mut s = String::from(
        "# throwaway Postfix for txmap tests (chaos-tests/src/postfix.rs)\n\
         # service type  private unpriv  chroot  wakeup  maxproc command\n",
    );
    s.push_str(&format!("127.0.0.1:{port} inet n - n - - smtpd\n"));
    for line in [
        "pickup    unix  n - n 60    1 pickup",
        "cleanup   unix  n - n -     0 cleanup",
        "qmgr      unix  n - n 300   1 qmgr",
        "rewrite   unix  - - n -     - trivial-rewrite",
        "bounce    unix  - - n -     0 bounce",
        "defer     unix  - - n -     0 bounce",
        "trace     unix  - - n -     0 bounce",
        "verify    unix  - - n -     1 verify",
        "flush     unix  n - n 1000? 0 flush",
        "proxymap  unix  - - n -     - proxymap",
        "proxywrite unix - - n -     1 proxymap",
        "showq     unix  n - n -     - showq",
        "error     unix  - - n -     - error",
        "retry     unix  - - n -     - error",
        "discard   unix  - - n -     - discard",
        "anvil     unix  - - n -     1 anvil",
        "scache    unix  - - n -     1 scache",
        "postlog   unix-dgram n - n - 1 postlogd",
        // Delivery: nothing is ever delivered anywhere.
        "local     unix  - n n -     - discard",
        "virtual   unix  - n n -     - discard",
        "smtp      unix  - - n -     - discard",
        "relay     unix  - - n -     - discard",
        "sympa     unix  - n n -     - discard",
        "sympabounce unix - n n -    - discard",
    ] {
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn spawn_and_wait(layout: &Layout, port: u16) -> Result<(Child, u32)> {
    let out = std::fs::File::create(&layout.master_out).context("create master.out")?;
    let err = out.try_clone()?;
    let mut master = Command::new(MASTER)
        .arg("-c")
        .arg(&layout.conf)
        .arg("-d")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: master SIGTERMs its group when stopped, and nothing of the
        // test process is in it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {MASTER}"))?;
    let pgid = master.id();
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let until = Instant::now() + START_TIMEOUT;
    let failure = |master: &mut Child, why: String| -> anyhow::Error {
        let _ = master.kill();
        let _ = master.wait();
        for pid in processes_in_group(pgid) {
            signal(pid, "KILL");
        }
        let out = std::fs::read_to_string(&layout.master_out).unwrap_or_default();
        let log = std::fs::read_to_string(layout.log.join("postfix.log")).unwrap_or_default();
        anyhow::anyhow!(
            "Postfix on port {port}: {why} (master logs its early fatal errors to syslog only: \
             try `{MASTER} -c {} -d` under strace, or `postfix -c {} check`)\n\
             master output: {}\nmaillog: {}",
            layout.conf.display(),
            layout.conf.display(),
            out.trim(),
            log.trim()
        )
    };
    loop {
        if let Ok(Some(st)) = master.try_wait() {
            return Err(failure(&mut master, format!("master exited ({st})")));
        }
        if banner_ok(addr) {
            return Ok((master, pgid));
        }
        if Instant::now() > until {
            return Err(failure(
                &mut master,
                format!("no SMTP banner after {START_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when `addr` answers with a `220` banner.
fn banner_ok(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut w = &stream;
    let mut r = BufReader::new(&stream);
    let ok = matches!(read_reply(&mut r), Ok((220, _)));
    let _ = w.write_all(b"QUIT\r\n");
    let _ = read_reply(&mut r);
    ok
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn mkdir(path: &Path, mode: u32, owner: Option<(u32, Option<u32>)>) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), gid).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// `(uid, gid)` of a user, from `/etc/passwd`.
fn user_ids(name: &str) -> Result<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == name {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("no user {name} in /etc/passwd (is postfix installed?)")
}

/// The gid of a group, from `/etc/group`.
fn group_id(name: &str) -> Result<u32> {
    let text = std::fs::read_to_string("/etc/group").context("read /etc/group")?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 2 && f[0] == name {
            return Ok(f[2].parse()?);
        }
    }
    bail!("no group {name} in /etc/group (is postfix installed?)")
}

/// `(pgid, state)` of a process, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((pgrp, state))
}

fn process_group_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|(g, _)| g)
}

/// The live (non-zombie) processes whose process group is `pgid`.
pub fn processes_in_group(pgid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(
            |&pid| matches!(proc_stat(pid), Some((g, st)) if g == pgid && st != 'Z' && st != 'X'),
        )
        .collect();
    pids.sort_unstable();
    pids
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// SMTP prober
// ---------------------------------------------------------------------------------------------

/// Timeouts of the prober (connect, each read and write).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One SMTP reply to a `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply code (250, 451, 550, ...).
    pub code: u16,
    /// The reply text (multi-line replies joined with ` / `).
    pub text: String,
    /// Time from sending `RCPT TO` to the complete reply.
    pub latency: Duration,
}

/// What one SMTP session produced: a reply for each recipient asked before any failure.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Replies, in the order of the recipients (shorter than them when `error` is set).
    pub replies: Vec<Reply>,
    /// Why the session ended early (connect, banner, EHLO, MAIL, I/O, timeout).
    pub error: Option<String>,
}

/// Opens a fresh connection to `addr`, does `EHLO`, `MAIL FROM:<>`, one `RCPT TO` per address,
/// `QUIT`, and returns each `RCPT` reply code. Fails if the session could not be completed.
pub fn probe(addr: SocketAddr, rcpts: &[String]) -> Result<Vec<u16>> {
    let s = probe_session(addr, rcpts, PROBE_TIMEOUT);
    match s.error {
        Some(e) => bail!(
            "SMTP session to {addr} failed after {} of {} RCPT replies: {e}",
            s.replies.len(),
            rcpts.len()
        ),
        None => Ok(s.replies.iter().map(|r| r.code).collect()),
    }
}

/// [`probe`] with the whole replies and the timings; never fails, the error is in the result.
pub fn probe_session(addr: SocketAddr, rcpts: &[String], timeout: Duration) -> Session {
    let mut session = Session::default();
    if let Err(e) = run_session(addr, rcpts, timeout, &mut session.replies) {
        session.error = Some(format!("{e:#}"));
    }
    session
}

fn run_session(
    addr: SocketAddr,
    rcpts: &[String],
    timeout: Duration,
    replies: &mut Vec<Reply>,
) -> Result<()> {
    let stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut w = &stream;
    let mut r = BufReader::new(&stream);
    let (code, text) = read_reply(&mut r).context("banner")?;
    if code != 220 {
        bail!("banner: {text}");
    }
    let (code, text) = command(&mut w, &mut r, "EHLO prober.txmap.test")?;
    if code != 250 {
        bail!("EHLO: {text}");
    }
    let (code, text) = command(&mut w, &mut r, "MAIL FROM:<>")?;
    if code != 250 {
        bail!("MAIL FROM: {text}");
    }
    for rcpt in rcpts {
        let t0 = Instant::now();
        let (code, text) = command(&mut w, &mut r, &format!("RCPT TO:<{rcpt}>"))?;
        replies.push(Reply {
            code,
            text,
            latency: t0.elapsed(),
        });
        if code == 421 {
            bail!("server closed the session after RCPT TO:<{rcpt}>");
        }
    }
    // The answers are in; a lost QUIT reply changes nothing.
    let _ = command(&mut w, &mut r, "QUIT");
    Ok(())
}

/// Sends one command line and reads its reply.
fn command(w: &mut &TcpStream, r: &mut impl BufRead, line: &str) -> Result<(u16, String)> {
    w.write_all(format!("{line}\r\n").as_bytes())
        .with_context(|| format!("send {line}"))?;
    read_reply(r).with_context(|| format!("reply to {line}"))
}

/// Reads one (possibly multi-line) SMTP reply: `(code, text)`.
fn read_reply(r: &mut impl BufRead) -> Result<(u16, String)> {
    let mut text = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed by the server");
        }
        let line = line.trim_end();
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("malformed SMTP reply {line:?}"))?;
        text.push(line.to_string());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text.join(" / ")));
        }
    }
}

/// Replies to one address, by class.
#[derive(Debug, Clone, Default)]
pub struct ReplyCounts {
    /// 2xx: accepted.
    pub accepted: u64,
    /// 4xx: temporary failure (e.g. `451 4.3.0 Temporary lookup failure`).
    pub temp_fail: u64,
    /// 5xx: refused (e.g. `550 5.1.1 ... User unknown`).
    pub refused: u64,
    /// Anything else.
    pub other: u64,
    /// Replies slower than the loop's delay threshold (whatever their code).
    pub delayed: u64,
    /// The slowest reply.
    pub max_latency: Duration,
    /// The first few distinct non-2xx replies.
    pub samples: Vec<String>,
}

impl ReplyCounts {
    /// Every reply counted.
    pub fn total(&self) -> u64 {
        self.accepted + self.temp_fail + self.refused + self.other
    }

    /// Replies that were not 2xx.
    pub fn not_accepted(&self) -> u64 {
        self.total() - self.accepted
    }

    fn add(&mut self, reply: &Reply, delay_threshold: Duration) {
        match reply.code / 100 {
            2 => self.accepted += 1,
            4 => self.temp_fail += 1,
            5 => self.refused += 1,
            _ => self.other += 1,
        }
        if reply.latency > delay_threshold {
            self.delayed += 1;
        }
        self.max_latency = self.max_latency.max(reply.latency);
        if reply.code / 100 != 2 && self.samples.len() < 5 && !self.samples.contains(&reply.text) {
            self.samples.push(reply.text.clone());
        }
    }

    fn merge(&mut self, o: &ReplyCounts) {
        self.accepted += o.accepted;
        self.temp_fail += o.temp_fail;
        self.refused += o.refused;
        self.other += o.other;
        self.delayed += o.delayed;
        self.max_latency = self.max_latency.max(o.max_latency);
        for s in &o.samples {
            if self.samples.len() < 5 && !self.samples.contains(s) {
                self.samples.push(s.clone());
            }
        }
    }
}

/// What a [`ProbeLoop`] saw.
#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    /// Replies per address.
    pub per_address: BTreeMap<String, ReplyCounts>,
    /// SMTP sessions attempted (one TCP connection each).
    pub connections: u64,
    /// Sessions that ended early (refused connection, lost connection, timeout, 421).
    pub session_errors: u64,
    /// The first few distinct session errors.
    pub error_samples: Vec<String>,
    /// How long the loop ran.
    pub elapsed: Duration,
    /// The latency above which a reply counts as delayed.
    pub delay_threshold: Duration,
}

impl ProbeStats {
    /// All addresses together.
    pub fn total(&self) -> ReplyCounts {
        let mut t = ReplyCounts::default();
        for c in self.per_address.values() {
            t.merge(c);
        }
        t
    }

    /// `RCPT` lookups answered.
    pub fn lookups(&self) -> u64 {
        self.per_address.values().map(ReplyCounts::total).sum()
    }

    /// `RCPT` lookups answered per second.
    pub fn lookups_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.lookups() as f64 / s
        } else {
            0.0
        }
    }

    /// What happened after `earlier` (a snapshot of the same loop): counts are differences;
    /// latencies and samples are those of `self`.
    pub fn since(&self, earlier: &ProbeStats) -> ProbeStats {
        let mut d = self.clone();
        d.connections -= earlier.connections.min(d.connections);
        d.session_errors -= earlier.session_errors.min(d.session_errors);
        d.elapsed = d.elapsed.saturating_sub(earlier.elapsed);
        for (addr, c) in d.per_address.iter_mut() {
            if let Some(e) = earlier.per_address.get(addr) {
                c.accepted -= e.accepted.min(c.accepted);
                c.temp_fail -= e.temp_fail.min(c.temp_fail);
                c.refused -= e.refused.min(c.refused);
                c.other -= e.other.min(c.other);
                c.delayed -= e.delayed.min(c.delayed);
            }
        }
        d
    }

    fn add_session(&mut self, rcpts: &[String], s: &Session, delay_threshold: Duration) {
        self.connections += 1;
        for (rcpt, reply) in rcpts.iter().zip(&s.replies) {
            self.per_address
                .entry(rcpt.clone())
                .or_default()
                .add(reply, delay_threshold);
        }
        if let Some(e) = &s.error {
            self.session_errors += 1;
            if self.error_samples.len() < 5 && !self.error_samples.contains(e) {
                self.error_samples.push(e.clone());
            }
        }
    }
}

impl fmt::Display for ProbeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.total();
        writeln!(
            f,
            "{} sessions ({} failed) in {:.2?}: {} RCPT lookups ({:.0}/s): {} 2xx, {} 4xx, {} 5xx, {} other; {} slower than {:?} (max {:.1?})",
            self.connections,
            self.session_errors,
            self.elapsed,
            self.lookups(),
            self.lookups_per_sec(),
            t.accepted,
            t.temp_fail,
            t.refused,
            t.other,
            t.delayed,
            self.delay_threshold,
            t.max_latency,
        )?;
        for (addr, c) in &self.per_address {
            writeln!(
                f,
                "  {addr}: {} 2xx, {} 4xx, {} 5xx, {} other, {} delayed, max {:.1?}",
                c.accepted, c.temp_fail, c.refused, c.other, c.delayed, c.max_latency
            )?;
            for s in &c.samples {
                writeln!(f, "    e.g. {s}")?;
            }
        }
        for e in &self.error_samples {
            writeln!(f, "  session error e.g. {e}")?;
        }
        Ok(())
    }
}

/// Options of a [`ProbeLoop`].
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Connect/read/write timeout of each session.
    pub timeout: Duration,
    /// Replies slower than this count as delayed.
    pub delay_threshold: Duration,
    /// Pause between sessions (zero: back to back).
    pub pause: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: PROBE_TIMEOUT,
            delay_threshold: Duration::from_millis(100),
            pause: Duration::ZERO,
        }
    }
}

/// A thread that probes the same addresses over fresh SMTP sessions, back to back, until
/// stopped. Dropping it stops it too.
#[derive(Debug)]
pub struct ProbeLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ProbeStats>>,
    thread: Option<JoinHandle<()>>,
}

impl ProbeLoop {
    /// Starts probing `rcpts` (all in each session) at `addr` with default options.
    pub fn start(addr: SocketAddr, rcpts: Vec<String>) -> Result<ProbeLoop> {
        ProbeLoop::start_with(addr, rcpts, ProbeOptions::default())
    }

    /// Starts probing with `opts`.
    pub fn start_with(
        addr: SocketAddr,
        rcpts: Vec<String>,
        opts: ProbeOptions,
    ) -> Result<ProbeLoop> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ProbeStats {
            delay_threshold: opts.delay_threshold,
            ..ProbeStats::default()
        }));
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("smtp-prober".into())
            .spawn(move || {
                let t0 = Instant::now();
                while !stop2.load(Ordering::SeqCst) {
                    let s = probe_session(addr, &rcpts, opts.timeout);
                    {
                        let mut st = stats2.lock().unwrap_or_else(|e| e.into_inner());
                        st.add_session(&rcpts, &s, opts.delay_threshold);
                        st.elapsed = t0.elapsed();
                    }
                    if s.error.is_some() {
                        // Do not spin on a dead server.
                        std::thread::sleep(Duration::from_millis(10));
                    } else if !opts.pause.is_zero() {
                        std::thread::sleep(opts.pause);
                    }
                }
                let mut st = stats2.lock().unwrap_or_else(|e| e.into_inner());
                st.elapsed = t0.elapsed();
            })
            .context("spawn the prober thread")?;
        Ok(ProbeLoop {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The figures so far.
    pub fn snapshot(&self) -> ProbeStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops after the current session and returns the final figures.
    pub fn stop(mut self) -> ProbeStats {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProbeLoop {
    fn drop(&mut self) {
        self.halt();
    }
}
