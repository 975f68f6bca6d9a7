//! Guarantee 8 (least privilege), with real processes and a real attacker: an unprivileged user
//! (`nobody`, via `setpriv`) who can write a table's source (the `sympa` user's position) or
//! drop files in the hook's `requests/` directory can change that table's content and nothing
//! else. txmapd runs as root here, as it does in production.
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

/// Runs the hook as `user`:`group`, killing it after `limit`. None: it was still running.
fn hook_within(
    c: &TestCluster,
    user: &str,
    group: &str,
    arg: &Path,
    limit: Duration,
) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut child = spawn_hook(c, 1, user, group, arg);
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
    let out = as_user(
        "nobody",
        "nogroup",
        &[
            "ln",
            "-sfn",
            secret.to_str().unwrap(),
            source.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
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
    let out = as_user(
        "nobody",
        "nogroup",
        &["ln", "-sfn", "/dev/zero", source.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", describe(&out));
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
    let out = as_user(
        "nobody",
        "nogroup",
        &[
            "ln",
            "-sfn",
            victim.to_str().unwrap(),
            planted.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
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
