//! Power loss (issue 13): a FUSE filesystem that forgets what was not fsynced
//! (`txmap_chaos_tests::lossyfs`), first shown to lose data, then under a real cluster whose
//! nodes lose power. These tests need `/dev/fuse` and `fusermount3` (Debian's `fuse3`) and run
//! as root: where either is missing they fail and say so, they never pass without a cut.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use txmap_chaos_tests::chaos::schedule::{profile, Fault, Kind, PowerMoment};
use txmap_chaos_tests::chaos::{run, Options, Report, POWER};
use txmap_chaos_tests::cluster::{
    bins, describe, transport_table, wait_until, TempDir, TestCluster,
};
use txmap_chaos_tests::lossyfs::cluster::{served, PowerCluster};
use txmap_chaos_tests::lossyfs::{self, LossyMount};

/// The cluster tests and chaos runs load the machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn need_fuse() {
    if let Err(e) = lossyfs::check_available() {
        panic!("{e:#}");
    }
}

fn fsync_dir(d: &Path) {
    std::fs::File::open(d).unwrap().sync_all().unwrap();
}

fn write_file(p: &Path, bytes: &[u8], sync: bool) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(p)
        .unwrap();
    f.write_all(bytes).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

/// A lossy mount of an empty temporary directory holding `old` (durable: it was there before).
fn mounted(name: &str) -> (TempDir, LossyMount) {
    need_fuse();
    let t = TempDir::new(name);
    let dir = t.0.join("disk");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("old"), b"old content\n").unwrap();
    let m = LossyMount::over(&dir).unwrap();
    (t, m)
}

#[test]
fn a_write_without_fsync_is_gone_after_a_power_cut() {
    let (t, mut m) = mounted("power-write");
    let d = t.0.join("disk");
    // a file whose name is durable (directory fsynced) but whose data is not
    write_file(&d.join("data"), b"", false);
    fsync_dir(&d);
    write_file(&d.join("data"), b"never synced\n", false);
    // an existing durable file overwritten in place, and a new file, neither synced
    write_file(&d.join("old"), b"overwritten\n", false);
    write_file(&d.join("new"), b"new\n", false);
    assert_eq!(std::fs::read(d.join("data")).unwrap(), b"never synced\n");
    let dirty = m.dirty().unwrap();
    assert!(dirty.files >= 2 && dirty.dirs >= 1, "{dirty:?}");
    let r = m.cut(1, false).unwrap();
    assert!(r.files_reverted >= 2, "{r:?}");
    assert_eq!(
        std::fs::read(d.join("data")).unwrap(),
        b"",
        "unsynced data survived"
    );
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"old content\n");
    assert!(
        !d.join("new").exists(),
        "a new file in an unsynced directory survived"
    );
    m.unmount().unwrap();
    // unmounted: the directory is back in place with what survived
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"old content\n");
}

#[test]
fn a_rename_without_a_directory_fsync_is_undone() {
    let (t, mut m) = mounted("power-rename");
    let d = t.0.join("disk");
    write_file(&d.join(".tmp"), b"new content\n", true); // the file itself is synced
    std::fs::rename(d.join(".tmp"), d.join("old")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    write_file(&d.join("sub").join("f"), b"in a new directory\n", true);
    fsync_dir(&d.join("sub")); // but its parent is never synced
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"new content\n");
    m.cut(2, false).unwrap();
    assert_eq!(
        std::fs::read(d.join("old")).unwrap(),
        b"old content\n",
        "the rename survived without a directory fsync"
    );
    assert!(
        !d.join(".tmp").exists(),
        "the temporary name was never durable"
    );
    assert!(
        !d.join("sub").exists(),
        "a directory whose parent was not synced survived"
    );
}

#[test]
fn with_the_right_fsyncs_writes_renames_links_and_directories_survive() {
    let (t, mut m) = mounted("power-synced");
    let d = t.0.join("disk");
    write_file(&d.join(".tmp"), b"new content\n", true);
    std::fs::rename(d.join(".tmp"), d.join("old")).unwrap();
    write_file(&d.join(".dec"), b"commit\n", true);
    std::fs::hard_link(d.join(".dec"), d.join("decision")).unwrap();
    std::fs::remove_file(d.join(".dec")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    write_file(&d.join("sub").join("f"), b"in a new directory\n", true);
    fsync_dir(&d.join("sub"));
    fsync_dir(&d);
    // a later unsynced change on top: lost, the synced state stays
    write_file(&d.join("old"), b"later, unsynced\n", false);
    assert_eq!(m.dirty().unwrap().dirs, 0);
    m.cut(3, false).unwrap();
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"new content\n");
    assert_eq!(std::fs::read(d.join("decision")).unwrap(), b"commit\n");
    assert!(!d.join(".dec").exists());
    assert_eq!(
        std::fs::read(d.join("sub").join("f")).unwrap(),
        b"in a new directory\n"
    );
    // flock works on it (txmap's table locks, postmap's own)
    let f = std::fs::File::open(d.join("old")).unwrap();
    fs4::FileExt::lock(&f).unwrap();
    let g = std::fs::File::open(d.join("old")).unwrap();
    assert!(
        fs4::FileExt::try_lock(&g).is_err(),
        "a second exclusive flock was granted"
    );
}

#[test]
fn postmap_builds_on_it_and_a_db_whose_directory_was_not_synced_is_lost() {
    let (t, mut m) = mounted("power-postmap");
    let d = t.0.join("disk");
    std::fs::write(t.0.join("main.cf"), b"").unwrap(); // postmap's config, off the lossy disk
    write_file(
        &d.join("t"),
        transport_table("a.example", 0..50).as_bytes(),
        true,
    );
    fsync_dir(&d);
    let out = std::process::Command::new("postmap")
        .arg("-c")
        .arg(&t.0)
        .arg(format!("hash:{}", d.join("t").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let q = txmap_chaos_tests::cluster::postmap_query(
        &t.0,
        &d.join("t"),
        &["list7@a.example".to_string()],
    )
    .unwrap();
    assert_eq!(q[0].as_deref(), Some("sympa:list7@a.example"));
    m.cut(4, false).unwrap();
    assert!(
        !d.join("t.db").exists(),
        "postmap never fsyncs the directory: its .db must be gone with the entry"
    );
    assert_eq!(
        std::fs::read(d.join("t")).unwrap(),
        transport_table("a.example", 0..50).as_bytes()
    );
}

/// The system calls txmap issues behave on it as on a local disk: `O_NOFOLLOW` refuses a
/// symlink, `O_EXCL` an existing name, `link(2)` an existing target; modes and owners set on a
/// descriptor stick; the link count follows links and unlinks; and `ftruncate`/`O_TRUNC`
/// without fsync are undone by a cut while a truncation that was synced stays.
#[test]
fn txmaps_system_calls_behave_as_on_a_local_disk() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (t, mut m) = mounted("power-syscalls");
    let d = t.0.join("disk");
    std::os::unix::fs::symlink("old", d.join("link")).unwrap();
    let e = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(d.join("link"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.join("old"))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    write_file(&d.join("a"), b"0123456789", true);
    std::fs::hard_link(d.join("a"), d.join("b")).unwrap();
    assert_eq!(std::fs::metadata(d.join("a")).unwrap().nlink(), 2);
    let e = std::fs::hard_link(d.join("a"), d.join("b")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    std::fs::remove_file(d.join("b")).unwrap();
    assert_eq!(std::fs::metadata(d.join("a")).unwrap().nlink(), 1);
    let f = std::fs::File::open(d.join("a")).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    std::os::unix::fs::fchown(&f, Some(65534), Some(65534)).unwrap();
    let md = std::fs::metadata(d.join("a")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o600, 65534, 65534)
    );
    std::fs::create_dir(d.join("sub")).unwrap();
    write_file(&d.join("sub").join("x"), b"x", true);
    fsync_dir(&d.join("sub"));
    fsync_dir(&d);
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "link", "old", "sub"]);
    // unsynced truncations are undone; a synced one stays
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("a"))
        .unwrap()
        .set_len(3)
        .unwrap();
    write_file(&d.join("old"), b"", false); // O_TRUNC
    let synced = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("sub").join("x"))
        .unwrap();
    synced.set_len(0).unwrap();
    synced.sync_all().unwrap();
    m.cut(9, false).unwrap();
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"0123456789");
    assert_eq!(std::fs::read(d.join("old")).unwrap(), b"old content\n");
    assert_eq!(std::fs::read(d.join("sub").join("x")).unwrap(), b"");
    assert_eq!(
        std::fs::read_link(d.join("link")).unwrap(),
        std::path::PathBuf::from("old")
    );
    let md = std::fs::metadata(d.join("a")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o600, 65534));
}

/// A Unix socket binds on it (the hook's socket lives in the state directory) and serves;
/// after a cut its name stays (the directory was synced) and nobody listens on it any more.
#[test]
fn a_unix_socket_binds_and_serves_on_it() {
    use std::io::Read;
    let (t, mut m) = mounted("power-socket");
    let d = t.0.join("disk");
    let l = std::os::unix::net::UnixListener::bind(d.join("s.sock")).unwrap();
    let mut c = std::os::unix::net::UnixStream::connect(d.join("s.sock")).unwrap();
    c.write_all(b"x").unwrap();
    let (mut a, _) = l.accept().unwrap();
    let mut b = [0u8; 1];
    a.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
    fsync_dir(&d);
    drop((a, c, l));
    m.cut(10, false).unwrap();
    assert!(std::fs::symlink_metadata(d.join("s.sock")).is_ok());
    assert!(std::os::unix::net::UnixStream::connect(d.join("s.sock")).is_err());
}

// ---- a real cluster on lossy disks ----

fn commit_ok(c: &TestCluster, via: usize) -> u64 {
    let (code, report) = c.commit_json(via);
    assert_eq!(code, Some(0), "commit via node{via}: {report}");
    report["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {report}"))
}

/// After the cut node is back: every node serves `generation` whole, all agree, nothing staged
/// or locked, nothing in progress.
fn all_serve(c: &TestCluster, generation: u64, sha: &str) -> Result<(), String> {
    for i in 1..=c.n {
        let s = served(c, i)?;
        if s.generation != generation || s.sha256 != sha {
            return Err(format!(
                "node{i} serves generation {} ({}), expected generation {generation} ({})",
                s.generation,
                &s.sha256[..12.min(s.sha256.len())],
                &sha[..12.min(sha.len())]
            ));
        }
        if !c.staged_files(i).is_empty() {
            return Err(format!("node{i}: staged files {:?}", c.staged_files(i)));
        }
        if !c.lock_free(i) {
            return Err(format!("node{i}: table lock held"));
        }
    }
    Ok(())
}

fn source_sha(c: &TestCluster) -> String {
    txmap_common::table::hex(
        &txmap_common::table::digest_file(&c.source())
            .unwrap()
            .sha256,
    )
}

/// Commits twice, cuts node `k`'s power right after the second commit was acknowledged,
/// restarts it; returns whether every node then serves the acknowledged commit.
fn cut_after_acknowledged_commit(name: &str, k: usize, env: &[(&str, &str)]) -> Result<(), String> {
    need_fuse();
    let _serial = serial();
    let mut c = PowerCluster::mount(TestCluster::create(name, 3).unwrap()).unwrap();
    for i in 1..=3 {
        c.start_node_with(i, env).unwrap();
    }
    c.write_source(&transport_table("a.example", 0..30));
    commit_ok(&c, 1);
    c.write_source(&transport_table("b.example", 0..40));
    let g = commit_ok(&c, 1);
    let sha = source_sha(&c);
    let t = Instant::now();
    let r = c.cut_power(k, 13, true, &mut []).unwrap();
    eprintln!(
        "node{k} lost power {:?} after the acknowledged commit: {r:?}",
        t.elapsed()
    );
    c.restart(k).unwrap();
    // the restarted node resolves by itself; give it the in-doubt bound at most
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(15), || {
        last = all_serve(&c, g, &sha);
        last.is_ok()
    });
    if ok {
        // and it goes on committing
        c.write_source(&transport_table("c.example", 0..20));
        let g2 = commit_ok(&c, k);
        assert!(g2 > g);
        all_serve(&c, g2, &source_sha(&c))?;
    }
    last
}

#[test]
fn a_participant_that_loses_power_right_after_an_acknowledged_commit_still_serves_it() {
    cut_after_acknowledged_commit("power-ack-2", 2, &[]).unwrap();
}

#[test]
fn the_coordinators_node_that_loses_power_right_after_an_acknowledged_commit_still_serves_it() {
    cut_after_acknowledged_commit("power-ack-1", 1, &[]).unwrap();
}

/// The same cut with the directory fsync after the install renames removed
/// (`TXMAP_DEFECTS=install-skips-dir-fsync`, a failpoints build only): the node comes back
/// serving the previous table while its journal says the new one. This is what shows that the
/// two tests above can fail.
#[test]
fn without_the_directory_fsync_after_the_install_renames_the_cut_loses_the_commit() {
    let r = cut_after_acknowledged_commit(
        "power-defect",
        2,
        &[("TXMAP_DEFECTS", "install-skips-dir-fsync")],
    );
    let e = r.expect_err("the power cut did not catch the missing directory fsync");
    eprintln!("caught: {e}");
    assert!(e.contains("node2"), "{e}");
}

// ---- the chaos runner's power profile ----

fn seed(default: u64) -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn power_violations(r: &Report) -> usize {
    r.invariants
        .iter()
        .find(|(n, _)| *n == POWER)
        .map(|(_, t)| t.violations.len())
        .unwrap_or(0)
}

/// CI: the `power` profile, at least 100 power cuts of random nodes at random moments
/// (coordinator's node while deciding, participants while installing, right after commits),
/// zero violations of any checker, in under 5 minutes.
#[test]
fn power_profile_over_100_power_cuts_zero_violations_under_5_minutes() {
    need_fuse();
    let _serial = serial();
    bins(); // the budget is for the run itself
    let started = Instant::now();
    let opts = Options::new(profile("power").unwrap(), seed(1313));
    let report = run(&opts).expect("the chaos run itself failed");
    let took = started.elapsed();
    println!("{}", report.render());
    println!("test wall time: {:.1} s", took.as_secs_f64());
    let cuts = report
        .faults
        .iter()
        .find(|f| f.label == Kind::PowerCut.label())
        .map(|f| f.injected)
        .unwrap_or(0);
    assert!(cuts >= 100, "only {cuts} power cuts");
    let moments = |f: &dyn Fn(&PowerMoment) -> bool| {
        report
            .schedule
            .steps
            .iter()
            .filter(|s| matches!(&s.fault, Fault::PowerCut { moment, .. } if f(moment)))
            .count()
    };
    assert!(moments(&|m| matches!(m, PowerMoment::Deciding { .. })) >= 5);
    assert!(moments(&|m| matches!(m, PowerMoment::Installing { .. })) >= 5);
    assert!(moments(&|m| matches!(m, PowerMoment::AfterCommit)) >= 5);
    assert!(
        report
            .invariants
            .iter()
            .any(|(n, t)| *n == POWER && t.checks >= 2 * cuts),
        "the power checker did not run after every cut"
    );
    let v = report.violations();
    assert!(
        v.is_empty(),
        "{} violations (seed {}): first: {}",
        v.len(),
        report.schedule.seed,
        v[0]
    );
    assert!(
        took < Duration::from_secs(300),
        "the power profile took {took:?}, over 5 minutes"
    );
}

/// The power profile catches a txmap that does not fsync the table directory after the
/// install renames (`TXMAP_DEFECTS=install-skips-dir-fsync`): a node that loses power after
/// acknowledging a commit comes back serving the previous table. The same seed without the
/// defect: no violation.
#[test]
fn the_power_profile_catches_a_missing_directory_fsync_after_the_install_renames() {
    need_fuse();
    let _serial = serial();
    let mut opts = Options::new(profile("power").unwrap(), seed(2));
    opts.transactions = 8;
    opts.defects = Some("install-skips-dir-fsync".into());
    let report = run(&opts).expect("the chaos run itself failed");
    println!("{}", report.render());
    assert!(
        power_violations(&report) > 0,
        "the missing fsync went unnoticed: the power checker cannot fail"
    );
    opts.defects = None;
    let sound = run(&opts).expect("the chaos run itself failed");
    println!("{}", sound.render());
    assert_eq!(
        sound.schedule.fingerprint(),
        report.schedule.fingerprint(),
        "same seed, same schedule"
    );
    let v = sound.violations();
    assert!(v.is_empty(), "without the defect: {v:?}");
}

// ---- a power cut right before and right after each durability step of a commit ----

/// Where [`cut_at`] stops the commit and cuts a node's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// node2: the staged source is written (its fsync runs beside the build); its `postmap`
    /// has not started.
    BeforeBuild,
    /// node2: `postmap` built the staged `.db` (Berkeley DB fsyncs the file as it closes it);
    /// txmapd has not fsynced it nor the table directory.
    AfterBuild,
    /// node2: staged files, `.db`, table directory and history copies fsynced
    /// (`participant::after_stage`); the journal does not say *Prepared* yet.
    AfterStage,
    /// node2: the journal says *Prepared* (durable); the vote is not sent
    /// (`participant::after_prepared_durable`).
    AfterPrepared,
    /// node1, the coordinator's node: every node prepared, no decision yet
    /// (`coordinator::after_all_prepared`).
    BeforeDecision,
    /// node1: the commit decision is durable, no `Commit` sent
    /// (`coordinator::after_decision_durable`).
    AfterDecision,
    /// node2: the journal says *Installing*; the renames have not started
    /// (`participant::before_commit_rename`).
    BeforeRenames,
    /// node2: both renames done and the table directory fsynced; history and the journal's
    /// *Committed* not written (`participant::after_commit_rename`).
    AfterRenames,
}

const HOLD_MS: u64 = 4000;

fn postmap_path() -> String {
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = format!("{d}/postmap");
        if Path::new(&p).exists() {
            return p;
        }
    }
    "postmap".into()
}

/// A `postmap` for node2 that, for a build (no `-s`/`-q`), waits while `hold-before` exists
/// (after dropping `at-before`) and after building while `hold-after` exists. It first moves
/// into the table directory (on the lossy disk), so the power cut finds and kills it as one of
/// the node's processes.
fn holding_postmap(dir: &Path, table_dir: &Path) -> std::path::PathBuf {
    let script = format!(
        r#"#!/bin/sh
cd '{table}' || exit 1
build=1
for a in "$@"; do case "$a" in -s|-q|-s*|-q*) build=0;; esac; done
if [ $build = 1 ] && [ -e '{d}/hold-before' ]; then
  touch '{d}/at-before'
  while [ -e '{d}/hold-before' ]; do sleep 0.05; done
fi
'{postmap}' "$@"
rc=$?
if [ $build = 1 ] && [ -e '{d}/hold-after' ]; then
  touch '{d}/at-after'
  while [ -e '{d}/hold-after' ]; do sleep 0.05; done
fi
exit $rc
"#,
        table = table_dir.display(),
        d = dir.display(),
        postmap = postmap_path()
    );
    let p = dir.join("holding-postmap");
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn phase(c: &TestCluster, i: usize) -> Option<String> {
    c.active(i).map(|(_, p)| p)
}

/// Commits once (generation 1), then commits a new source and cuts the power of node1 or
/// node2 at `at`; restarts it; then every node must end serving the newest source, whole, in
/// agreement, with nothing staged or locked; after a cut at or after the durable decision the
/// cut transaction itself must be the one committed everywhere, before it the cut transaction
/// must be aborted everywhere (the pending retry then commits the source anew).
fn cut_at(at: At) {
    need_fuse();
    let _serial = serial();
    let name = format!("power-at-{at:?}").to_lowercase();
    let mut c = PowerCluster::mount(TestCluster::create(&name, 3).unwrap()).unwrap();
    let hold_dir = c.dir.0.join("hold");
    std::fs::create_dir_all(&hold_dir).unwrap();
    let wrapper = holding_postmap(&hold_dir, &c.table_dir(2));
    for i in 1..=3 {
        c.edit_config(i, |t| {
            let mut t = t;
            for (k, v) in [
                ("prepare_ms", 2000),
                ("commit_ms", 1000),
                ("total_ms", 6000),
                ("in_doubt_ms", 5000),
                ("retry_max_ms", 2000),
            ] {
                t = txmap_chaos_tests::chaos::config_edit::set_key(
                    &t,
                    Some("timeouts"),
                    k,
                    &v.to_string(),
                );
            }
            if i == 2 {
                t = txmap_chaos_tests::chaos::config_edit::set_key(
                    &t,
                    Some("postfix"),
                    "postmap",
                    &format!("\"{}\"", wrapper.display()),
                );
            }
            t
        });
    }
    let fp = |p: &str| format!("{p}=sleep({HOLD_MS})");
    let participant_fp = match at {
        At::AfterStage => Some(fp("participant::after_stage")),
        At::AfterPrepared => Some(fp("participant::after_prepared_durable")),
        At::BeforeRenames => Some(fp("participant::before_commit_rename")),
        At::AfterRenames => Some(fp("participant::after_commit_rename")),
        _ => None,
    };
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    c.write_source(&transport_table("a.example", 0..30));
    commit_ok(&c, 1);
    // Arm node2 only now: the first commit must not stop.
    if let Some(f) = &participant_fp {
        c.kill_node(2);
        c.start_node_with(2, &[("FAILPOINTS", f)]).unwrap();
    }
    let hold = |f: &str| std::fs::write(hold_dir.join(f), b"").unwrap();
    match at {
        At::BeforeBuild => hold("hold-before"),
        At::AfterBuild => hold("hold-after"),
        _ => {}
    }
    c.write_source(&transport_table("b.example", 0..40));
    let new_sha = source_sha(&c);
    let coordinator_fp = match at {
        At::BeforeDecision => vec![("FAILPOINTS", fp("coordinator::after_all_prepared"))],
        At::AfterDecision => vec![("FAILPOINTS", fp("coordinator::after_decision_durable"))],
        _ => vec![],
    };
    let env: Vec<(&str, &str)> = coordinator_fp
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let commit = c.spawn_txmap_with(1, &["commit", "sympa_transport", "--json"], &env);
    // Wait until the commit is where the cut must land.
    let held = |c: &TestCluster| -> bool {
        let new_live = || {
            txmap_common::table::digest_file(&c.live(2))
                .map(|d| txmap_common::table::hex(&d.sha256) == new_sha)
                .unwrap_or(false)
        };
        match at {
            At::BeforeBuild => hold_dir.join("at-before").exists(),
            At::AfterBuild => hold_dir.join("at-after").exists(),
            At::AfterStage => std::fs::read_dir(c.state_dir(2).join("history/sympa_transport"))
                .map(|rd| {
                    rd.flatten().any(|e| {
                        e.file_name().to_string_lossy().starts_with(".tx-")
                            && e.path().join("source").exists()
                    })
                })
                .unwrap_or(false),
            At::AfterPrepared => phase(c, 2).as_deref() == Some("Prepared"),
            At::BeforeDecision => (1..=3).all(|i| phase(c, i).as_deref() == Some("Prepared")),
            At::AfterDecision => !c.decisions(1).is_empty(),
            At::BeforeRenames => phase(c, 2).as_deref() == Some("Installing"),
            At::AfterRenames => phase(c, 2).as_deref() == Some("Installing") && new_live(),
        }
    };
    assert!(
        wait_until(Duration::from_secs(10), || held(&c)),
        "the commit never reached {at:?}"
    );
    std::thread::sleep(Duration::from_millis(150)); // inside the hold
    let txid = (1..=3).find_map(|i| c.active(i)).map(|(t, _)| t);
    let node = match at {
        At::BeforeDecision | At::AfterDecision => 1,
        _ => 2,
    };
    let mut commit = vec![commit];
    let extra: &mut [std::process::Child] = if node == 1 { &mut commit } else { &mut [] };
    let r = c.cut_power(node, 7, true, extra).unwrap();
    eprintln!("{at:?}: node{node} lost power: {r:?}");
    // What the disk kept, before the node restarts and cleans up: the staged files' names are
    // durable only once the table directory was fsynced (step 5).
    let staged = c.staged_files(2);
    match at {
        At::BeforeBuild | At::AfterBuild => assert!(
            staged.is_empty(),
            "{at:?}: staged files survived a cut before the directory fsync: {staged:?}"
        ),
        At::AfterStage | At::AfterPrepared => assert!(
            staged.len() >= 2,
            "{at:?}: fsynced staged files were lost: {staged:?}"
        ),
        _ => {}
    }
    for f in ["hold-before", "hold-after"] {
        let _ = std::fs::remove_file(hold_dir.join(f));
    }
    c.restart(node).unwrap();
    for p in &mut commit {
        let _ = p.wait();
    }
    // Every node ends on the newest source, whole and in agreement, by itself (a commit that
    // was cut is re-driven, resolved or retried from the pending record).
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(30), || {
        let g = served(&c, 1).map(|s| s.generation).unwrap_or(0);
        last = all_serve(&c, g, &new_sha);
        last.is_ok() && c.nothing_in_progress(1)
    });
    assert!(ok, "{at:?}: the cluster did not converge whole: {last:?}");
    if let Some(txid) = txid {
        let decided = matches!(at, At::AfterDecision | At::BeforeRenames | At::AfterRenames);
        for i in 1..=3 {
            let o = c.outcome(i, &txid);
            if decided {
                assert_eq!(o.as_deref(), Some("Committed"), "{at:?}: node{i}: {o:?}");
            } else {
                assert_ne!(o.as_deref(), Some("Committed"), "{at:?}: node{i} committed");
            }
        }
    }
}

#[test]
fn a_power_cut_before_the_staged_table_is_built_aborts_and_converges() {
    cut_at(At::BeforeBuild);
}

#[test]
fn a_power_cut_after_postmap_built_but_before_the_fsyncs_aborts_and_converges() {
    cut_at(At::AfterBuild);
}

#[test]
fn a_power_cut_after_staging_is_durable_but_before_the_journal_aborts_and_converges() {
    cut_at(At::AfterStage);
}

#[test]
fn a_power_cut_after_the_prepared_journal_before_the_vote_aborts_and_converges() {
    cut_at(At::AfterPrepared);
}

#[test]
fn a_power_cut_of_the_coordinators_node_before_the_decision_aborts_and_converges() {
    cut_at(At::BeforeDecision);
}

#[test]
fn a_power_cut_of_the_coordinators_node_after_the_durable_decision_commits_everywhere() {
    cut_at(At::AfterDecision);
}

#[test]
fn a_power_cut_after_the_installing_journal_before_the_renames_commits_everywhere() {
    cut_at(At::BeforeRenames);
}

#[test]
fn a_power_cut_after_the_renames_before_the_committed_journal_commits_everywhere() {
    cut_at(At::AfterRenames);
}

// ---- the Sympa hook's queue ----

/// `txmap-sympa` run while the local `txmapd` is down queues the request in
/// `requests/<table>` and tells Sympa it "stays queued": a power cut of the node before the
/// daemon is back must not lose it. (Failed before the fix: the queued file was renamed into
/// place without an fsync of `requests/`, and `requests/` itself was created without an fsync
/// of the state directory.)
#[test]
fn a_request_queued_by_the_hook_while_the_daemon_is_down_survives_a_power_cut() {
    need_fuse();
    let _serial = serial();
    let mut c = PowerCluster::start("power-hook-queue", 3).unwrap();
    c.write_source(&transport_table("a.example", 0..30));
    commit_ok(&c, 1);
    c.kill_node(1);
    c.write_source(&transport_table("queued.example", 0..25));
    let sha = source_sha(&c);
    let out = std::process::Command::new("env")
        .args(["-i", "PATH=/bin:/usr/bin"])
        .arg(format!("TXMAP_CONFIG={}", c.config(1).display()))
        .arg(&bins().txmap_sympa)
        .arg(c.source())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stays queued"),
        "{}",
        describe(&out)
    );
    let r = c.cut_power(1, 3, false, &mut []).unwrap();
    eprintln!("node1 lost power with its request queued: {r:?}");
    c.restart(1).unwrap();
    let mut last = Err(String::new());
    let ok = wait_until(Duration::from_secs(30), || {
        let g = served(&c, 1).map(|s| s.generation).unwrap_or(0);
        last = all_serve(&c, g, &sha);
        last.is_ok()
    });
    assert!(ok, "the queued request was lost in the power cut: {last:?}");
}
