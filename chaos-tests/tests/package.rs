//! The Debian package (issue 12, item 6), built and installed as an operator would: the test
//! builds it with `scripts/package/build-deb.sh`, installs it with `dpkg -i` into a clean
//! Debian root (`debootstrap --variant=minbase` with Postfix, made once by
//! `scripts/package/debian-root.sh` and cached as a tarball under `target/package-test/`),
//! and in that root, through `chroot`:
//!
//! - the maintainer scripts created the `txmap` user, `/var/lib/txmap` and `/etc/txmap/maps`
//!   (owned by `txmap`) and enabled the unit;
//! - the man pages `txmap(8)`, `txmapd(8)`, `txmap-sympa(8)`, `txmap.toml(5)` and the bash,
//!   zsh and fish completions are in place and say what they should;
//! - the installed binaries run: a `txmap sandbox` of two nodes whose `txmapd`s run as the
//!   package's `txmap` user, a commit to both, and the root's own `postmap` answers from the
//!   committed table on each node;
//! - the unit's `systemd-analyze security` exposure (printed) is at most 3.0 and
//!   `systemd-analyze verify` finds nothing.
//!
//! Needs root (chroot, debootstrap), as CI runs. It fails with the cause when the Debian root
//! cannot be made (no debootstrap, no mirror); it never passes without having installed the
//! package. As a normal user it says so and does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use txmap_chaos_tests::cluster::{describe, is_root, wait_until, TempDir};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(out.status.success(), "{shown} failed: {}", describe(&out));
    out
}

/// A command run inside the Debian root, as root or as `user`.
fn chroot(root: &Path, user: Option<&str>, argv: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    if let Some(u) = user {
        c.arg(format!("--userspec={u}:{u}"));
    }
    c.arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .env("NO_COLOR", "1");
    c
}

/// Builds the package (dev profile: it tests the packaging, not the optimizer) in the chaos
/// harness's target directory, whose dependencies `cargo test` has already built.
fn build_package(out: &Path) -> PathBuf {
    let root = workspace();
    let started = Instant::now();
    let built = run_ok(
        Command::new(root.join("scripts/package/build-deb.sh"))
            .args(["--profile", "dev", "--target-dir"])
            .arg(root.join("target/chaos"))
            .arg("--out")
            .arg(out)
            .current_dir(&root),
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    eprintln!(
        "package: built {} in {:.1} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        deb.is_file(),
        "build-deb.sh printed no package: {}",
        describe(&built)
    );
    deb
}

/// The cached Debian root tarball (made on first use; fails with the cause otherwise).
fn debian_root_tarball() -> PathBuf {
    let root = workspace();
    // Renamed whenever debian-root.sh installs other packages, so that no stale root is used.
    let tar = root.join("target/package-test/debian-root-postfix-systemd.tar");
    std::fs::create_dir_all(tar.parent().unwrap()).unwrap();
    let started = Instant::now();
    let out = run(Command::new(root.join("scripts/package/debian-root.sh")).arg(&tar));
    assert!(
        out.status.success(),
        "cannot make the clean Debian root for the package test (debootstrap --variant=minbase \
         from the host's Debian mirror; set TXMAP_DEBIAN_MIRROR to use another): {}",
        describe(&out)
    );
    eprintln!(
        "package: Debian root tarball ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tar
}

/// Fails unless no file system is mounted under `root` (nothing is mounted by this test;
/// removing the tree with a mount inside would reach into the host).
fn nothing_mounted_under(root: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = root.to_string_lossy().into_owned();
    !mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m.starts_with(&prefix))
}

/// A UDP port base with `n` free ports on 127.0.0.1.
fn free_ports(n: u16) -> u16 {
    let mut base = 30000 + (std::process::id() % 1000) as u16 * 20;
    loop {
        if (0..n).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
        base += n + 1;
    }
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn zcat(path: &Path) -> String {
    let out = run_ok(Command::new("gzip").arg("-dc").arg(path));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_installs_into_a_clean_root_and_its_binaries_commit() {
    if !is_root() {
        eprintln!("package: skipped: needs root (debootstrap, chroot); CI runs it as root");
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("package");
    let deb = build_package(&dir.0.join("deb"));
    let tarball = debian_root_tarball();

    // A fresh copy of the clean root.
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let t = Instant::now();
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--numeric-owner", "-xf"])
            .arg(&tarball),
    );
    eprintln!(
        "package: root extracted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        root.join("usr/sbin/postmap").exists(),
        "the Debian root has no postmap"
    );
    assert!(
        !root.join("usr/sbin/txmapd").exists(),
        "the root is not clean"
    );

    // Install.
    std::fs::copy(&deb, root.join("tmp/txmap.deb")).unwrap();
    let t = Instant::now();
    let installed = run(&mut chroot(&root, None, &["dpkg", "-i", "/tmp/txmap.deb"]));
    assert!(
        installed.status.success(),
        "dpkg -i failed in the clean root: {}",
        describe(&installed)
    );
    eprintln!("package: dpkg -i in {:.1} s", t.elapsed().as_secs_f64());
    let status = run_ok(&mut chroot(
        &root,
        None,
        &["dpkg-query", "-W", "-f=${Status} ${Version}", "txmap"],
    ));
    assert!(
        String::from_utf8_lossy(&status.stdout).starts_with("install ok installed"),
        "{}",
        describe(&status)
    );

    // Maintainer scripts: the user, its directories, the unit enabled.
    let id = run_ok(&mut chroot(&root, None, &["id", "txmap"]));
    let id = String::from_utf8_lossy(&id.stdout).into_owned();
    assert!(!id.contains("uid=0("), "txmap is root: {id}");
    let owner = |p: &str| {
        let o = run_ok(&mut chroot(&root, None, &["stat", "-c", "%U:%G %a", p]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(owner("/var/lib/txmap"), "txmap:txmap 755");
    assert_eq!(owner("/etc/txmap/maps"), "txmap:txmap 755");
    assert_eq!(owner("/etc/txmap"), "root:root 755");
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/txmapd.service")
            .symlink_metadata()
            .is_ok(),
        "the unit is not enabled"
    );

    // Binaries, man pages, completions.
    for (bin, args) in [
        ("/usr/bin/txmap", "--version"),
        ("/usr/sbin/txmapd", "--version"),
    ] {
        let o = run_ok(&mut chroot(&root, None, &[bin, args]));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{bin}: {}",
            describe(&o)
        );
    }
    let hook = run(&mut chroot(&root, None, &["/usr/bin/txmap-sympa"]));
    assert_eq!(hook.status.code(), Some(2), "{}", describe(&hook));
    let man = root.join("usr/share/man");
    for (page, needles) in [
        (
            "man8/txmap.8.gz",
            &[
                ".TH txmap 8",
                "txmap commit",
                "txmap rollback",
                "EXIT STATUS",
            ][..],
        ),
        ("man8/txmapd.8.gz", &[".TH txmapd 8", "NOTIFY_SOCKET"][..]),
        (
            "man8/txmap-sympa.8.gz",
            &[".TH txmap-sympa 8", "TABLE_PATH", "aliases_program"][..],
        ),
        (
            "man5/txmap.toml.5.gz",
            &[
                ".TH TXMAP.TOML 5",
                "state_dir",
                "max_shrink_percent",
                "in_service",
            ][..],
        ),
    ] {
        let text = zcat(&man.join(page));
        for n in needles {
            assert!(text.contains(n), "{page} lacks {n:?}");
        }
    }
    for (path, needle) in [
        ("usr/share/bash-completion/completions/txmap", "complete -F"),
        (
            "usr/share/bash-completion/completions/txmapd",
            "complete -F",
        ),
        (
            "usr/share/bash-completion/completions/txmap-sympa",
            "complete -F",
        ),
        ("usr/share/zsh/vendor-completions/_txmap", "#compdef txmap"),
        (
            "usr/share/zsh/vendor-completions/_txmapd",
            "#compdef txmapd",
        ),
        (
            "usr/share/zsh/vendor-completions/_txmap-sympa",
            "#compdef txmap-sympa",
        ),
        (
            "usr/share/fish/vendor_completions.d/txmap.fish",
            "complete -c txmap",
        ),
        (
            "usr/share/fish/vendor_completions.d/txmapd.fish",
            "complete -c txmapd",
        ),
        (
            "usr/share/fish/vendor_completions.d/txmap-sympa.fish",
            "complete -c txmap-sympa",
        ),
        (
            "usr/share/doc/txmap/examples/txmap.toml",
            "state_dir = \"/var/lib/txmap\"",
        ),
    ] {
        let text =
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(text.contains(needle), "{path} lacks {needle:?}");
    }
    // The bash completion knows the subcommands.
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/txmap")).unwrap();
    assert!(bash.contains("check-config") && bash.contains("sandbox"));

    // A sandbox commit with the installed binaries, every process as the package's user.
    let base = free_ports(2);
    run_ok(&mut chroot(
        &root,
        None,
        &[
            "txmap",
            "sandbox",
            "/tmp/sb",
            "--nodes",
            "2",
            "--base-port",
            &base.to_string(),
        ],
    ));
    run_ok(&mut chroot(
        &root,
        None,
        &["chown", "-R", "txmap:txmap", "/tmp/sb"],
    ));
    let mut daemons = Daemons(Vec::new());
    for i in 1..=2 {
        let log = std::fs::File::create(dir.0.join(format!("txmapd{i}.log"))).unwrap();
        let cfg = format!("/tmp/sb/node{i}/txmap.toml");
        let child = chroot(
            &root,
            Some("txmap"),
            &["/usr/sbin/txmapd", "--config", &cfg],
        )
        .env("TXMAP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
        daemons.0.push(child);
    }
    for i in 1..=2 {
        let log = dir.0.join(format!("txmapd{i}.log"));
        let ready = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("txmapd ready")
        });
        assert!(
            ready,
            "installed txmapd {i} not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let source = root.join("tmp/sb/shared/sympa_transport");
    std::fs::write(
        &source,
        "list1@lists.example.org sympa:list1@lists.example.org\n\
         list2@lists.example.org sympa:list2@lists.example.org\n",
    )
    .unwrap();
    let commit = run(&mut chroot(
        &root,
        Some("txmap"),
        &[
            "txmap",
            "--config",
            "/tmp/sb/node1/txmap.toml",
            "commit",
            "sympa_transport",
        ],
    ));
    assert_eq!(
        commit.status.code(),
        Some(0),
        "commit with the installed binaries: {}\nlogs: {}",
        describe(&commit),
        std::fs::read_to_string(dir.0.join("txmapd2.log")).unwrap_or_default()
    );
    for i in 1..=2 {
        let q = run_ok(&mut chroot(
            &root,
            None,
            &[
                "postmap",
                "-c",
                &format!("/tmp/sb/node{i}/postfix"),
                "-q",
                "list2@lists.example.org",
                &format!("hash:/tmp/sb/node{i}/postfix/sympa_transport"),
            ],
        ));
        assert_eq!(
            String::from_utf8_lossy(&q.stdout).trim(),
            "sympa:list2@lists.example.org",
            "node{i}"
        );
    }
    let status = run(&mut chroot(
        &root,
        Some("txmap"),
        &["txmap", "--config", "/tmp/sb/node1/txmap.toml", "status"],
    ));
    assert_eq!(status.status.code(), Some(0), "{}", describe(&status));
    drop(daemons);

    // The unit: systemd's own judgement.
    let unit = root.join("lib/systemd/system/txmapd.service");
    let analyze = which("systemd-analyze")
        .expect("systemd-analyze is missing on this host (Debian package systemd)");
    let sec = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let text = String::from_utf8_lossy(&sec.stdout).into_owned();
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {}", describe(&sec)))
        .to_string();
    eprintln!("package: systemd-analyze security --offline=yes txmapd.service: {overall}");
    let exposure: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {overall:?}"));
    assert!(exposure <= 3.0, "exposure {exposure} > 3.0:\n{text}");
    let verify = run(Command::new(&analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/lib/systemd/system/txmapd.service")
        .env("MANPATH", root.join("usr/share/man")));
    let verdict = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    eprintln!(
        "package: systemd-analyze verify txmapd.service: exit {:?}, {}",
        verify.status.code(),
        if verdict.trim().is_empty() {
            "no findings"
        } else {
            verdict.trim()
        }
    );
    assert!(
        verify.status.success() && verdict.trim().is_empty(),
        "systemd-analyze verify: {verdict}"
    );

    // Purge: the state directory goes, the user's tables stay.
    let purge = run(&mut chroot(&root, None, &["dpkg", "--purge", "txmap"]));
    assert!(purge.status.success(), "{}", describe(&purge));
    assert!(!root.join("var/lib/txmap").exists());
    assert!(!root.join("usr/sbin/txmapd").exists());

    if !nothing_mounted_under(&root) {
        let shown = root.display().to_string();
        std::mem::forget(dir);
        panic!("something is mounted under {shown}: not removing it");
    }
    eprintln!("package: done in {:.1} s", t0.elapsed().as_secs_f64());
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
