//! Guarantee 8 (least privilege), with real processes and a real attacker: an unprivileged user
//! (`nobody`, via `setpriv`) who can write a table's source (the `sympa` user's position) or
//! drop files in the hook's `requests/` directory can change that table's content and nothing
//! else. txmapd runs as root here (or as `TXMAP_TEST_DAEMON_USER`), except in the tests that
//! run it as a dedicated user (`txmap-test`) or in a mount namespace without `/proc`; those
//! also hold 1,000 hook connections and plant a link at the socket path.
//!
//! These tests need root (to become `nobody`, and to be the root that must not be fooled); as a
//! normal user they are skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{bins, describe, is_root, transport_table, TestCluster, TABLE};

/// Runs `argv` as `user`:`group` with no supplementary groups.
fn as_user(user: &str, group: &str, argv: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={user}"))
        .arg(format!("--regid={group}"))
        .arg("--clear-groups")
        .args(argv)
        .output()
        .unwrap()
}

/// Starts `txmap-sympa ARG` as Sympa runs it (one argument, environment cleared, default
/// config path bind-mounted from node `i`'s directory in a private mount namespace), as
/// `user`:`group`. Works with any version of the hook.
fn spawn_hook(
    c: &TestCluster,
    i: usize,
    user: &str,
    group: &str,
    arg: &Path,
) -> std::process::Child {
    std::fs::create_dir_all("/etc/txmap").unwrap();
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /etc/txmap && exec setpriv --reuid=\"$4\" --regid=\"$5\" --clear-groups \
             env -i PATH=/bin:/usr/bin \"$2\" \"$3\"",
        )
        .arg("sh")
        .arg(c.node_dir(i))
        .arg(&bins().txmap_sympa)
        .arg(arg)
        .arg(user)
        .arg(group)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Plants a symbolic link `link` -> `target` as the unprivileged attacker (`nobody`).
fn plant_link(target: &str, link: &str) {
    let out = as_user("nobody", "nogroup", &["ln", "-sfn", target, link]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Runs the hook as `user`:`group`, killing it after `limit`. None: it was still running.
fn hook_within(
    c: &TestCluster,
    user: &str,
    group: &str,
    arg: &Path,
    limit: Duration,
) -> (Option<i32>, String, Duration) {
    output_within(spawn_hook(c, 1, user, group, arg), limit)
}

/// Waits for `child`, killing it after `limit`: its exit code (None: it was still running),
/// its output, and how long it ran.
fn output_within(
    mut child: std::process::Child,
    limit: Duration,
) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), describe(&out), started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (None, describe(&out), started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes the shared source directory (and its files) belong to `nobody`: the attacker can
/// replace the source, as the `sympa` user can replace Sympa's.
fn give_sources_to_nobody(c: &TestCluster) -> PathBuf {
    let shared = c.root().join("shared");
    let st = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(&shared)
        .status()
        .unwrap();
    assert!(st.success());
    shared.join(TABLE)
}

/// Every regular file under `dir` (links not followed) whose bytes contain `needle`, except
/// the inode `skip` (the secret itself).
fn files_containing(dir: &Path, needle: &[u8], skip: (u64, u64)) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && (m.dev(), m.ino()) != skip {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

fn secret_file(c: &TestCluster) -> (PathBuf, String, (u64, u64)) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let marker = format!("SECRET{}", txmap_common::proto::TxId::random());
    let p = c.root().join("root-only-secret");
    // A valid table line: if root ever read it, it would build and go live.
    std::fs::write(&p, format!("leaked@x.example smtp:{marker}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = std::fs::metadata(&p).unwrap();
    (p, marker, (m.dev(), m.ino()))
}

fn cluster(name: &str) -> Option<TestCluster> {
    if !is_root() {
        eprintln!("skipped: needs root to run the attacker as nobody");
        return None;
    }
    let c = TestCluster::start(name, 3).unwrap();
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    Some(c)
}

fn assert_secret_nowhere(c: &TestCluster, marker: &str, skip: (u64, u64)) {
    let leaks = files_containing(&c.root(), marker.as_bytes(), skip);
    assert!(leaks.is_empty(), "the secret leaked into {leaks:?}");
}

#[test]
fn a_symlink_at_the_source_to_a_root_only_file_is_refused_and_the_secret_appears_nowhere() {
    let Some(c) = cluster("priv-symlink") else {
        return;
    };
    let (secret, marker, skip) = secret_file(&c);
    let source = give_sources_to_nobody(&c);
    plant_link(secret.to_str().unwrap(), source.to_str().unwrap());
    let (code, text, _) = hook_within(&c, "nobody", "nogroup", &source, Duration::from_secs(20));
    assert!(
        code.is_some() && code != Some(0),
        "the hook must refuse: {text}"
    );
    assert!(text.contains("symbolic link"), "{text}");
    // Past a few pending-retry intervals: still nowhere.
    std::thread::sleep(Duration::from_secs(5));
    assert_secret_nowhere(&c, &marker, skip);
    let out = c.txmap(2, &["status", TABLE]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_hard_link_at_the_source_to_a_root_only_file_is_refused_and_the_secret_appears_nowhere() {
    let Some(c) = cluster("priv-hardlink") else {
        return;
    };
    let (secret, marker, skip) = secret_file(&c);
    let source = give_sources_to_nobody(&c);
    // Where fs.protected_hardlinks is off, the attacker can make this link; here root makes
    // it for them.
    std::fs::remove_file(&source).unwrap();
    std::fs::hard_link(&secret, &source).unwrap();
    let (code, text, _) = hook_within(&c, "nobody", "nogroup", &source, Duration::from_secs(20));
    assert!(
        code.is_some() && code != Some(0),
        "the hook must refuse: {text}"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_secret_nowhere(&c, &marker, skip);
}

/// The node must keep answering the cluster, and stop on SIGTERM.
fn assert_node_unharmed(c: &mut TestCluster) {
    let started = Instant::now();
    let out = c.txmap(2, &["status", TABLE]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    c.signal(1, libc::SIGTERM);
    let st = c.wait_exit(1, Duration::from_secs(5));
    assert!(st.is_some(), "txmapd did not stop on SIGTERM");
}

#[test]
fn a_fifo_at_the_source_neither_hangs_the_hook_nor_stalls_the_node() {
    let Some(mut c) = cluster("priv-fifo") else {
        return;
    };
    let source = give_sources_to_nobody(&c);
    std::fs::remove_file(&source).unwrap();
    let out = as_user("nobody", "nogroup", &["mkfifo", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let (code, text, took) = hook_within(&c, "nobody", "nogroup", &source, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("FIFO"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_node_unharmed(&mut c);
}

#[test]
fn dev_zero_at_the_source_neither_hangs_the_hook_nor_stalls_the_node() {
    let Some(mut c) = cluster("priv-zero") else {
        return;
    };
    let source = give_sources_to_nobody(&c);
    plant_link("/dev/zero", source.to_str().unwrap());
    let (code, text, took) = hook_within(&c, "nobody", "nogroup", &source, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_node_unharmed(&mut c);
}

#[test]
fn a_link_planted_in_requests_is_never_written_through() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // Production-like hook permissions: the socket and `requests/` belong to a group (here
    // `nogroup`), whose members are the attacker (`nobody`) and the hook's user (`daemon`).
    let mut c = TestCluster::create("priv-requests", 3).unwrap();
    c.edit_config(1, |s| {
        s.replace(
            "[hook]\nmode = \"0666\"",
            "[hook]\ngroup = \"nogroup\"\nmode = \"0660\"",
        )
    });
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c.write_source(&transport_table("b.example", 0..10));
    // A file the hook's user may write: the planted link aims at it.
    let victim = c.root().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let st = Command::new("chown")
        .arg("daemon")
        .arg(&victim)
        .status()
        .unwrap();
    assert!(st.success());
    let planted = c.node_dir(1).join("state/requests").join(TABLE);
    plant_link(victim.to_str().unwrap(), planted.to_str().unwrap());
    let (code, text, _) = hook_within(
        &c,
        "daemon",
        "nogroup",
        &c.source(),
        Duration::from_secs(20),
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the hook wrote through the planted link: {text}"
    );
    // The request itself still goes through the socket.
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn rollback_refuses_a_tampered_history_copy_and_uses_a_good_one() {
    let Some(c) = cluster("priv-rollback") else {
        return;
    };
    // Generation 1 is a.example (committed above); generation 2 is b.example.
    c.write_source(&transport_table("b.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    // Someone with write access to node1's state directory changes its copy of generation 1.
    let copy = c
        .node_dir(1)
        .join("state/history")
        .join(TABLE)
        .join("1/source");
    assert!(copy.is_file());
    std::fs::write(&copy, transport_table("evil.example", 0..10)).unwrap();
    let out = c.txmap(1, &["rollback", TABLE, "--to", "1"]);
    for i in 1..=3 {
        let live = std::fs::read_to_string(c.live(i)).unwrap();
        assert!(
            !live.contains("evil.example"),
            "node{i} serves the tampered copy: {}",
            describe(&out)
        );
    }
    if out.status.code() == Some(0) {
        for i in 1..=3 {
            let live = std::fs::read_to_string(c.live(i)).unwrap();
            assert!(live.contains("a.example"), "node{i}: {live}");
        }
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "a good copy exists on node2 and node3: {}",
        describe(&out)
    );
}

/// The dedicated user `txmapd` runs as in the non-root tests below (created if missing).
const DAEMON_USER: &str = "txmap-test";

/// The real and effective uid of process `pid` (from `/proc`: the test may use it; the
/// daemon must not).
fn uids_of(pid: u32) -> (u32, u32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let f: Vec<u32> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[1])
}

fn uid_of_user(user: &str) -> u32 {
    let out = Command::new("id").arg("-u").arg(user).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Every file under `dir` (links not followed) not owned by `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.uid() != uid {
                found.push(e.path());
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    found
}

#[test]
fn txmapd_runs_as_a_dedicated_non_root_user_commits_and_serves_the_hook() {
    if !is_root() {
        eprintln!("skipped: needs root to create and become the daemon's user");
        return;
    }
    let mut c = TestCluster::create("priv-user", 3).unwrap();
    c.set_daemon_user(Some(DAEMON_USER));
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    let uid = uid_of_user(DAEMON_USER);
    for i in 1..=3 {
        assert_eq!(uids_of(c.pid(i).unwrap()), (uid, uid), "node{i}'s txmapd");
    }
    // `txmap commit` (run as the daemon's user, as docs/sympa-postfix.md says), then the hook
    // as Sympa runs it (as another unprivileged user).
    c.write_source(&transport_table("a.example", 0..10));
    let out = c.commit(1);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    c.write_source(&transport_table("b.example", 0..20));
    let (code, text, took) = hook_within(
        &c,
        "nobody",
        "nogroup",
        &c.source(),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    for i in 1..=3 {
        let found = c.lookup(i, &["list19@b.example".to_string()]).unwrap();
        assert_eq!(
            found,
            vec![Some("sympa:list19@b.example".to_string())],
            "node{i}"
        );
        // Nothing in the table or state directories was written by root.
        for d in [c.table_dir(i), c.state_dir(i)] {
            let foreign: Vec<_> = not_owned_by(&d, uid)
                .into_iter()
                .filter(|p| !p.ends_with("main.cf"))
                .collect();
            assert!(foreign.is_empty(), "node{i}: not the daemon's: {foreign:?}");
        }
    }
    let out = c.txmap(2, &["status", TABLE]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn txmapd_without_proc_serves_100_hook_calls_with_every_node_up() {
    if !is_root() {
        eprintln!("skipped: needs root for a mount namespace");
        return;
    }
    let mut c = TestCluster::create("priv-noproc", 3).unwrap();
    for i in 1..=3 {
        c.set_wrapper(i, Some(TestCluster::no_proc_wrapper()));
        c.start_node(i).unwrap();
    }
    // Each daemon sees an empty /proc (its root, seen from outside, in its mount namespace).
    for i in 1..=3 {
        let pid = c.pid(i).unwrap();
        let seen: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(seen.is_empty(), "node{i}'s txmapd sees a /proc: {seen:?}");
    }
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    let g0 = c.journal_generation(1);
    let mut failures = Vec::new();
    let mut times = Vec::new();
    for k in 0..100 {
        c.write_source(&transport_table("a.example", 0..11 + k));
        let (code, text, took) = hook_within(
            &c,
            "nobody",
            "nogroup",
            &c.source(),
            Duration::from_secs(20),
        );
        times.push(took);
        if code != Some(0) {
            failures.push(format!("call {k}: {text}"));
        }
    }
    times.sort();
    let gens = c.generations();
    eprintln!(
        "no /proc: 100 hook calls, {} failure(s), p50 {} ms, max {} ms; generations {:?}",
        failures.len(),
        times[50].as_millis(),
        times[99].as_millis(),
        gens.iter()
            .map(|g| g.as_ref().map(|(n, _)| *n))
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s): {failures:#?}",
        failures.len()
    );
    // Every node up, on the last generation, with the same content.
    for i in 1..=3 {
        assert!(
            c.pid(i).is_some() && c.wait_exit(i, Duration::from_millis(1)).is_none(),
            "node{i} exited"
        );
    }
    assert_eq!(gens.len(), 3);
    let first = gens[0].clone().expect("node1 answers");
    assert_eq!(first.0, g0 + 100, "{gens:?}");
    assert!(gens.iter().all(|g| g.as_ref() == Some(&first)), "{gens:?}");
    for i in 1..=3 {
        let found = c.lookup(i, &["list109@a.example".to_string()]).unwrap();
        assert!(found[0].is_some(), "node{i}");
    }
}

/// A client, run as `nobody`, that opens `n` connections to the Unix socket `path` and holds
/// them until its stdin closes. It prints `connected N` once they are open.
fn spawn_socket_holder(path: &Path, n: usize) -> std::process::Child {
    const HOLDER: &str = r#"
        use Socket; use IO::Handle;
        my ($path, $n) = @ARGV; my @held; my $ok = 0; my $err = "";
        for (1 .. $n) {
            socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
            if (connect($s, pack_sockaddr_un($path))) { $ok++; push @held, $s; } else { $err = "$!"; }
        }
        print "connected $ok $err\n"; STDOUT->flush;
        my $wait = <STDIN>;
    "#;
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["/usr/bin/perl", "-e", HOLDER])
        .arg(path)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn a_thousand_held_hook_connections_leave_the_node_serving_within_a_fixed_fd_budget() {
    use std::io::BufRead;
    let Some(c) = cluster("priv-flood") else {
        return;
    };
    let pid = c.pid(1).unwrap();
    let before = fd_count(pid);
    let socket = c.state_dir(1).join("txmapd.sock");
    let mut holder = spawn_socket_holder(&socket, 1000);
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("connected 1000"), "holder: {line}");
    // Past one request timeout (10 s): the daemon drops stalled requests and takes the next.
    let started = Instant::now();
    let mut most = 0;
    let mut status_ms = Vec::new();
    let mut commits = 0;
    let mut k = 0;
    while started.elapsed() < Duration::from_secs(13) {
        most = most.max(fd_count(pid));
        let t = Instant::now();
        let out = c.txmap(2, &["status", TABLE]);
        status_ms.push(t.elapsed().as_millis());
        assert_eq!(
            out.status.code(),
            Some(0),
            "status from node2: {}",
            describe(&out)
        );
        most = most.max(fd_count(pid));
        k += 1;
        c.write_source(&transport_table("flood.example", 0..10 + k));
        let out = c.commit(2);
        assert_eq!(
            out.status.code(),
            Some(0),
            "commit through node2: {}",
            describe(&out)
        );
        commits += 1;
        most = most.max(fd_count(pid));
    }
    drop(holder.stdin.take());
    let _ = holder.wait();
    let budget = before + 64 + 32;
    eprintln!(
        "1000 held hook connections: txmapd fds {before} before, at most {most} during \
         (budget {budget}); {} status answers (slowest {} ms), {commits} commits through node2",
        status_ms.len(),
        status_ms.iter().max().unwrap()
    );
    assert!(most <= budget, "txmapd held {most} fds (before: {before})");
    // Once the flood is gone, the hook is served again (as many entries as before: this is
    // not about the content guard).
    c.write_source(&transport_table("after.example", 0..100));
    let (code, text, _) = hook_within(
        &c,
        "nobody",
        "nogroup",
        &c.source(),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn a_link_planted_at_the_socket_path_is_replaced_not_followed() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut c = TestCluster::create("priv-socklink", 3).unwrap();
    let victim = c.root().join("root-owned");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = c.state_dir(1).join("txmapd.sock");
    std::os::unix::fs::symlink(&victim, &socket).unwrap();
    let m0 = std::fs::metadata(&victim).unwrap();
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    let m1 = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        (m1.uid(), m1.gid(), m1.mode()),
        (m0.uid(), m0.gid(), m0.mode()),
        "txmapd changed the link's target"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket(),
        "the link is still there"
    );
    c.write_source(&transport_table("a.example", 0..10));
    let (code, text, _) = hook_within(
        &c,
        "nobody",
        "nogroup",
        &c.source(),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{text}");
    let m2 = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        (m2.uid(), m2.gid(), m2.mode()),
        (m0.uid(), m0.gid(), m0.mode())
    );
}

/// Starts, as `nobody`, a loop that searches `dirs` for `marker` in every file it can read
/// (links not followed) until its stdin closes: prints each hit, then `rounds N` on stderr.
fn spawn_poller(marker: &str, dirs: &[PathBuf]) -> std::process::Child {
    const POLL: &str = r#"
        m=$1; shift; n=0
        exec 3<&0
        ( cat <&3 >/dev/null; kill $$ ) &
        trap 'echo "rounds $n" >&2; exit 0' TERM
        while :; do grep -rlF -e "$m" -- "$@" 2>/dev/null; n=$((n+1)); done
    "#;
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["sh", "-c", POLL, "sh", marker])
        .args(dirs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_unprivileged_poller_never_sees_the_secret_during_a_symlink_attack() {
    let Some(c) = cluster("priv-poll") else {
        return;
    };
    let (secret, marker, _) = secret_file(&c);
    let source = give_sources_to_nobody(&c);
    // Everything a local user might read: tables, state (history, snapshots, requests),
    // logs (in the node directories), the shared sources.
    let mut poller = spawn_poller(&marker, &[c.root()]);
    let started = Instant::now();
    let mut codes = Vec::new();
    for _ in 0..5 {
        plant_link(secret.to_str().unwrap(), source.to_str().unwrap());
        let (code, _, _) = hook_within(&c, "nobody", "nogroup", &source, Duration::from_secs(20));
        codes.push(code);
    }
    // Through a few pending-retry intervals (2 s, 4 s) after the attack.
    std::thread::sleep(Duration::from_secs(7));
    drop(poller.stdin.take());
    let out = poller.wait_with_output().unwrap();
    let mut hits: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    hits.sort();
    hits.dedup();
    let rounds = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!(
        "poller as nobody over {} s: {}; hook exits {codes:?}",
        started.elapsed().as_secs(),
        rounds.trim()
    );
    assert!(hits.is_empty(), "nobody read the secret in: {hits:#?}");
    let n: u64 = rounds
        .trim()
        .strip_prefix("rounds ")
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    assert!(n >= 10, "the poller hardly ran: {rounds}");
    assert!(
        codes.iter().all(|c| c.is_some() && *c != Some(0)),
        "{codes:?}"
    );
}

#[test]
fn a_txmap_commit_run_by_root_leaves_a_non_root_txmapd_able_to_serve_the_hook() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut c = TestCluster::create("priv-rootcli", 3).unwrap();
    c.set_daemon_user(Some(DAEMON_USER));
    for i in 1..=3 {
        c.start_node(i).unwrap();
    }
    // The operator forgets `sudo -u txmap`: the CLI runs as root in txmapd's state directory.
    c.write_source(&transport_table("a.example", 0..10));
    let out = Command::new(&bins().txmap)
        .arg("--config")
        .arg(c.config(1))
        .args(["commit", TABLE])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // What root's command created in the daemon's state directory is the daemon's.
    let uid = uid_of_user(DAEMON_USER);
    let foreign = not_owned_by(&c.state_dir(1), uid);
    assert!(foreign.is_empty(), "left to root: {foreign:?}");
    c.write_source(&transport_table("b.example", 0..10));
    let (code, text, _) = hook_within(
        &c,
        "nobody",
        "nogroup",
        &c.source(),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{text}");
}

/// `txmap` run by root, with a timeout (None: it was still running and was killed).
fn root_txmap_within(c: &TestCluster, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let child = Command::new(&bins().txmap)
        .arg("--config")
        .arg(c.config(1))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, text, _) = output_within(child, limit);
    (code, text)
}

#[test]
fn txmap_commit_run_by_root_never_follows_a_planted_link_nor_blocks_on_a_fifo() {
    let Some(c) = cluster("priv-root-commit") else {
        return;
    };
    let (secret, marker, skip) = secret_file(&c);
    let source = give_sources_to_nobody(&c);
    plant_link(secret.to_str().unwrap(), source.to_str().unwrap());
    for args in [
        &["commit", TABLE][..],
        &["commit", TABLE, "--dry-run"],
        &["diff", TABLE],
    ] {
        let (code, text) = root_txmap_within(&c, args, Duration::from_secs(20));
        assert!(
            code.is_some() && code != Some(0),
            "{args:?} must refuse the link: {text}"
        );
        assert!(text.contains("symbolic link"), "{args:?}: {text}");
        assert!(
            !text.contains(&marker),
            "{args:?} printed the secret: {text}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_secret_nowhere(&c, &marker, skip);
    // A FIFO there: refused at once, never waited on.
    std::fs::remove_file(&source).unwrap();
    let out = as_user("nobody", "nogroup", &["mkfifo", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    for args in [&["commit", TABLE][..], &["commit", TABLE, "--dry-run"]] {
        let (code, text) = root_txmap_within(&c, args, Duration::from_secs(10));
        assert!(code.is_some(), "{args:?} hung on a FIFO: {text}");
        assert_ne!(code, Some(0), "{args:?}: {text}");
        assert!(text.contains("FIFO"), "{args:?}: {text}");
    }
}
