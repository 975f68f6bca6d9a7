//! Delta commits (issue 11), with real `postmap`/`postalias`, real QUIC on loopback and real
//! daemons: every delta commit leaves on every node exactly what a full build of the same
//! source gives; each fallback (drifted copy, drifted `.db`, big change, `cdb`, no base, a node
//! of the previous protocol) is taken and still correct; and a builder that lies is caught on
//! the full path and on the incremental path.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use txmap_chaos_tests::cluster::{describe, transport_table, TempDir, TestCluster, TABLE};

/// `postmap -s` (or `postalias -s`) of a built table, sorted, without postalias's own keys. A
/// `cdb` table cannot be listed: it is asked for every key of its source instead.
fn dump(confdir: &Path, builder: &str, kind: &str, path: &Path) -> Result<Vec<String>> {
    if kind == "cdb" {
        let src = std::fs::read_to_string(path)?;
        let keys: Vec<String> = src
            .lines()
            .filter(|l| l.starts_with(|c: char| !c.is_whitespace() && c != '#'))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        let mut child = Command::new(builder)
            .arg("-c")
            .arg(confdir)
            .args(["-q", "-"])
            .arg(format!("{kind}:{}", path.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = keys.join("\n") + "\n";
        let w = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
        let out = child.wait_with_output()?;
        let _ = w.join();
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        return Ok(v);
    }
    let out = Command::new(builder)
        .arg("-c")
        .arg(confdir)
        .arg("-s")
        .arg(format!("{kind}:{}", path.display()))
        .output()?;
    if !out.status.success() || !out.stderr.is_empty() {
        bail!("{builder} -s {}: {}", path.display(), describe(&out));
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !["@:", "YP_LAST_MODIFIED:", "YP_MASTER_NAME:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect();
    v.sort();
    Ok(v)
}

/// The dump of a full build of `source`, made apart from any node.
fn reference(confdir: &Path, builder: &str, kind: &str, source: &str) -> Result<Vec<String>> {
    let dir = TempDir::new("delta-ref");
    let p = dir.0.join("t");
    std::fs::write(&p, source)?;
    let out = Command::new(builder)
        .arg("-c")
        .arg(confdir)
        .arg(format!("{kind}:{}", p.display()))
        .output()?;
    if !out.status.success() {
        bail!("reference build: {}", describe(&out));
    }
    dump(confdir, builder, kind, &p)
}

fn commit_table(c: &TestCluster, via: usize, table: &str) -> (Option<i32>, serde_json::Value) {
    let out = c.txmap(via, &["commit", table, "--json", "--force"]);
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
    )
}

fn journal_of(c: &TestCluster, i: usize, table: &str) -> serde_json::Value {
    let p = c.state_dir(i).join("tables").join(format!("{table}.json"));
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn deltas_since_full(c: &TestCluster, i: usize, table: &str) -> u64 {
    journal_of(c, i, table)["deltas_since_full"]
        .as_u64()
        .unwrap_or(0)
}

fn shared(c: &TestCluster, table: &str) -> PathBuf {
    c.root().join("shared").join(table)
}

/// Every node's live table equals a full build of `source`.
fn assert_served(
    c: &TestCluster,
    table: &str,
    builder: &str,
    kind: &str,
    source: &str,
) -> Result<()> {
    let want = reference(&c.table_dir(1), builder, kind, source)?;
    for i in 1..=c.n {
        let got = dump(&c.table_dir(i), builder, kind, &c.table_dir(i).join(table))?;
        if got != want {
            let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).take(3).collect();
            bail!(
                "node{i} {table}: {} entries, reference {}; missing {missing:?}, extra {extra:?}",
                got.len(),
                want.len()
            );
        }
        let live = std::fs::read_to_string(c.table_dir(i).join(table))?;
        if live != source {
            bail!("node{i} {table}: the live source is not the committed source");
        }
    }
    Ok(())
}

/// A tiny deterministic generator, so a failing sequence can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// One random Sympa-like change to a table held as lines: adds (some with continuation lines
/// or comments), deletes, value changes, case changes.
fn mutate(lines: &mut Vec<String>, rng: &mut Rng, step: usize, alias: bool) {
    let sep = if alias { ": " } else { "\t" };
    for _ in 0..1 + rng.next(4) {
        let at = 1 + rng.next(lines.len().max(2) - 1);
        match rng.next(6) {
            0 | 1 => {
                let domain = if alias { "" } else { "@lists.example.org" };
                let mut l = format!("new{step}x{}{domain}{sep}sympa:new{step}@x", rng.next(1000));
                if rng.next(3) == 0 {
                    l.push_str(if alias {
                        ",\n  second@x"
                    } else {
                        "\n  continued"
                    });
                }
                if rng.next(4) == 0 {
                    l = format!("# list created at step {step}\n{l}");
                }
                lines.insert(at.min(lines.len()), l);
            }
            2 if lines.len() > 3 => {
                lines.remove(at.min(lines.len() - 1));
            }
            3 if lines.len() > 3 => {
                let i = at.min(lines.len() - 1);
                if let Some((k, _)) = lines[i].split_once(sep) {
                    if !k.starts_with('#') {
                        lines[i] = format!("{k}{sep}changed{step}@x");
                    }
                }
            }
            4 if lines.len() > 3 => {
                let i = at.min(lines.len() - 1);
                if let Some((k, v)) = lines[i].clone().split_once(sep) {
                    if !k.starts_with('#') {
                        lines[i] = format!("{}{sep}{v}", k.to_uppercase());
                    }
                }
            }
            _ => lines.push(format!("\n# blank line and comment at step {step}")),
        }
    }
}

fn text(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[test]
fn delta_commits_leave_what_a_full_build_gives() -> Result<()> {
    let c = TestCluster::start("delta-exact", 3)?;
    for (table, builder, alias) in [
        (TABLE, "postmap", false),
        ("sympa_aliases", "postalias", true),
    ] {
        let mut rng = Rng(0x5eed_0000 + alias as u64);
        let mut lines: Vec<String> = transport_table("lists.example.org", 0..2000)
            .lines()
            .map(|l| {
                if alias {
                    // Alias names are local parts.
                    l.replacen("@lists.example.org\t", ": ", 1)
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(shared(&c, table), text(&lines))?;
        let (code, r) = commit_table(&c, 1, table);
        assert_eq!(code, Some(0), "{table} first commit: {r}");
        assert_eq!(
            r["delta_nodes"], 0,
            "nothing to build on yet: whole tables ({r})"
        );
        for step in 1..=12 {
            mutate(&mut lines, &mut rng, step, alias);
            let src = text(&lines);
            std::fs::write(shared(&c, table), &src)?;
            let via = 1 + step % 3;
            let (code, r) = commit_table(&c, via, table);
            assert_eq!(code, Some(0), "{table} step {step}: {r}");
            assert_eq!(
                r["delta_nodes"], 3,
                "{table} step {step}: every node gets a delta ({r})"
            );
            let sent = r["bytes_sent"].as_u64().context("bytes_sent")?;
            assert!(
                sent * 100 < src.len() as u64 * 3,
                "{table} step {step}: {sent} bytes sent for {} bytes of table",
                src.len()
            );
            assert_served(&c, table, builder, "hash", &src)
                .with_context(|| format!("{table} after step {step}"))?;
        }
        for i in 1..=3 {
            assert_eq!(
                deltas_since_full(&c, i, table),
                12,
                "node{i} {table}: every change built incrementally"
            );
        }
    }
    // Every check was made by reading the staged `hash:` files (all keys are ASCII), and each
    // agreed with what the change says: none was handed to Postfix's tools.
    for i in 1..=3 {
        let log = std::fs::read_to_string(c.log(i))?;
        let native = log.matches("changed keys checked").count();
        let by_file = log.matches("by=\"reading the file\"").count();
        assert_eq!(native, 24, "node{i}: 24 incremental builds checked");
        assert_eq!(by_file, 24, "node{i}: each by reading the file");
        assert!(
            log.matches("built table checked by reading the file")
                .count()
                >= 2,
            "node{i}: the full builds of both tables too"
        );
    }
    Ok(())
}

#[test]
fn every_fallback_is_taken_and_correct() -> Result<()> {
    // A third table of type cdb, which Postfix cannot update in place.
    let mut c = TestCluster::start_edited("delta-fallback", 3, |i, text| {
        let _ = i;
        let path = text
            .lines()
            .find(|l| l.starts_with("path = ") && l.contains(TABLE))
            .map(|l| l.replace(TABLE, "cdb_table"))
            .unwrap_or_default();
        let source = text
            .lines()
            .find(|l| l.starts_with("source = ") && l.contains(TABLE))
            .map(|l| l.replace(TABLE, "cdb_table"))
            .unwrap_or_default();
        format!("{text}\n[[tables]]\nname = \"cdb_table\"\n{path}\n{source}\ntype = \"cdb\"\nbuilder = \"postmap\"\n")
    })?;
    let mut src = transport_table("lists.example.org", 0..1000);
    c.write_source(&src);
    assert_eq!(c.commit(1).status.code(), Some(0));

    // Drifted live source on node3 (someone edited it): its status says so (drift is state),
    // so the first attempt already sends it the whole table (a delta against its file would be
    // refused).
    let live3 = c.live(3);
    let mut drifted = std::fs::read_to_string(&live3)?;
    drifted.push_str("planted@x\tsmtp:evil\n");
    std::fs::write(&live3, drifted)?;
    src.push_str("added1@lists.example.org\tsympa:added1@x\n");
    c.write_source(&src);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(
        r["attempts"], 1,
        "the drifted node gets the whole table at once: {r}"
    );
    assert_eq!(r["delta_nodes"], 2, "node3 got the whole table: {r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;

    // Drifted live .db on node2 (touched): its status says so (drift is state), so it gets the
    // whole table and builds it in full; the result is the same. (A file that drifts after the
    // status round is still refused by the incremental build's own check.)
    let before = deltas_since_full(&c, 2, TABLE);
    let db2 = c.table_dir(2).join(format!("{TABLE}.db"));
    let f = std::fs::OpenOptions::new().append(true).open(&db2)?;
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))?;
    drop(f);
    src.push_str("added2@lists.example.org\tsympa:added2@x\n");
    c.write_source(&src);
    let (code, r) = c.commit_json(2);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 2, "node2 got the whole table: {r}");
    assert_eq!(
        deltas_since_full(&c, 2, TABLE),
        0,
        "node2 built in full (was {before})"
    );
    assert!(
        deltas_since_full(&c, 1, TABLE) >= 1,
        "node1 built incrementally"
    );
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    let log2 = std::fs::read_to_string(c.log(2))?;
    assert!(!log2.contains("panicked"), "{log2}");

    // A big change (more than delta_max_percent = 10 % of the entries): whole tables.
    src = transport_table("lists.example.org", 300..1300);
    c.write_source(&src);
    let (code, r) = c.commit_json(3);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 0, "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;

    // cdb: the delta travels, but the table is always built in full.
    let mut cdb = transport_table("cdb.example.org", 0..500);
    std::fs::write(shared(&c, "cdb_table"), &cdb)?;
    let (code, r) = commit_table(&c, 1, "cdb_table");
    assert_eq!(code, Some(0), "{r}");
    cdb.push_str("one-more@cdb.example.org\tsympa:x\n");
    std::fs::write(shared(&c, "cdb_table"), &cdb)?;
    let (code, r) = commit_table(&c, 1, "cdb_table");
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 3, "{r}");
    for i in 1..=3 {
        assert_eq!(
            deltas_since_full(&c, i, "cdb_table"),
            0,
            "node{i}: cdb is never updated in place"
        );
    }
    assert_served(&c, "cdb_table", "postmap", "cdb", &cdb)?;

    // A node of the previous protocol version (no delta messages): it gets whole tables, and
    // the mixed cluster commits.
    c.kill_node(3);
    c.start_node_with(3, &[("TXMAP_TEST_PROTOCOL", "2")])?;
    src.push_str("added3@lists.example.org\tsympa:added3@x\n");
    c.write_source(&src);
    for via in [1, 3] {
        // Through node3 the coordinator is of the previous version too.
        let env: &[(&str, &str)] = match via {
            3 => &[("TXMAP_TEST_PROTOCOL", "2")],
            _ => &[],
        };
        let out = c.txmap_with(via, &["commit", TABLE, "--json"], env);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(out.status.code(), Some(0), "via node{via}: {r}");
        let want = if via == 3 { 0 } else { 2 };
        assert_eq!(r["delta_nodes"], want, "via node{via}: {r}");
        assert_served(&c, TABLE, "postmap", "hash", &src)?;
        src.push_str(&format!("mixed{via}@lists.example.org\tsympa:m@x\n"));
        c.write_source(&src);
    }
    Ok(())
}

/// A `postmap` that runs the real one, then tampers with the table it built as the file `lie`
/// says: `<build|incr|both> <drop|wrong> KEY`.
fn lying_postmap(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("lying-postmap");
    let lie = dir.join("lie");
    std::fs::write(&lie, "")?;
    let script = format!(
        r#"#!/bin/sh
real=/usr/sbin/postmap
"$real" "$@" || exit $?
read -r when what key < {lie} || exit 0
[ -n "$key" ] || exit 0
cdir=""; incr=no; other=no; prev=""
for a in "$@"; do
  [ "$prev" = "-c" ] && cdir="$a"
  case "$a" in -i) incr=yes;; -s|-q|-d) other=yes;; esac
  prev="$a"; map="$a"
done
[ "$other" = yes ] && exit 0
mode=build; [ "$incr" = yes ] && mode=incr
[ "$when" = both ] || [ "$when" = "$mode" ] || exit 0
"$real" -c "$cdir" -d "$key" "$map" >/dev/null 2>&1
if [ "$what" = wrong ]; then printf '%s wrong-value\n' "$key" | "$real" -c "$cdir" -i "$map" 2>/dev/null; fi
exit 0
"#,
        lie = lie.display()
    );
    std::fs::write(&p, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(lie)
}

#[test]
fn a_lying_builder_is_caught_on_both_paths() -> Result<()> {
    let tmp = TempDir::new("delta-liar");
    let lie = lying_postmap(&tmp.0)?;
    let fake = tmp.0.join("lying-postmap");
    {
        // The daemons may run as another user: let them read the script and the lie.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&lie, std::fs::Permissions::from_mode(0o644))?;
    }
    let c = TestCluster::start_edited("delta-liar", 3, |i, text| {
        if i == 2 {
            text.replace(
                "[postfix]\n",
                &format!("[postfix]\npostmap = \"{}\"\n", fake.display()),
            )
        } else {
            text
        }
    })?;
    let mut src = transport_table("lists.example.org", 0..400);
    c.write_source(&src);
    assert_eq!(
        c.commit(1).status.code(),
        Some(0),
        "an honest builder commits"
    );
    let served = src.clone();

    let set_lie = |l: &str| std::fs::write(&lie, format!("{l}\n")).expect("write lie");
    let refused = |what: &str, src: &str| -> Result<()> {
        c.write_source(src);
        let (code, r) = c.commit_json(1);
        assert_eq!(code, Some(1), "{what}: aborted ({r})");
        let node2 = r["nodes"][1]["detail"].as_str().unwrap_or("");
        assert!(
            node2.contains("verif") || node2.contains("content"),
            "{what}: node2 says why: {r}"
        );
        assert_served(&c, TABLE, "postmap", "hash", &served).context(what.to_string())?;
        // Take the refused change back (a no-op commit clears its pending retry).
        c.write_source(&served);
        assert_eq!(c.commit(1).status.code(), Some(0), "{what}: no-op commit");
        Ok(())
    };
    // Full path (a change too big for a delta): one entry dropped, then one value wrong.
    let big = transport_table("lists.example.org", 100..600);
    set_lie("build drop list200@lists.example.org");
    refused("full build dropping an entry", &big)?;
    set_lie("build wrong list300@lists.example.org");
    refused("full build with a wrong value", &big)?;

    // Incremental path: the update lies about the added key. Node2 refuses its incremental
    // build, builds in full (honestly), and the commit is right.
    src.push_str("added@lists.example.org\tsympa:added@x\n");
    set_lie("incr wrong added@lists.example.org");
    c.write_source(&src);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 3, "{r}");
    assert_eq!(
        deltas_since_full(&c, 2, TABLE),
        0,
        "node2 fell back to the full build"
    );
    let log2 = std::fs::read_to_string(c.log(2))?;
    assert!(
        log2.contains("key `added@lists.example.org` has `wrong-value`"),
        "node2 says why: {log2}"
    );
    assert_served(&c, TABLE, "postmap", "hash", &src)?;

    // Both paths lie: nothing goes live anywhere.
    let served = src.clone();
    let mut next = src.clone();
    next.push_str("second@lists.example.org\tsympa:second@x\n");
    set_lie("both drop second@lists.example.org");
    c.write_source(&next);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(1), "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &served)?;
    Ok(())
}

#[test]
fn hook_requests_during_a_commit_are_served_by_one_next_transaction() -> Result<()> {
    // Node1's prepare takes 700 ms more than it needs: requests arriving meanwhile queue up.
    let mut c = TestCluster::create("delta-group", 3)?;
    c.start_node_with(1, &[("FAILPOINTS", "participant::after_stage=sleep(700)")])?;
    c.start_node(2)?;
    c.start_node(3)?;
    let mut src = transport_table("lists.example.org", 0..500);
    c.write_source(&src);
    assert_eq!(c.commit(1).status.code(), Some(0));
    let g0 = c.journal_generation(1);
    let hook = |c: &TestCluster| {
        Command::new(&txmap_chaos_tests::cluster::bins().txmap_sympa)
            .env("TXMAP_CONFIG", c.config(1))
            .arg(c.source())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let mut calls = Vec::new();
    for k in 0..6 {
        src.push_str(&format!("group{k}@lists.example.org\tsympa:group{k}@x\n"));
        c.write_source(&src);
        calls.push(hook(&c)?);
        std::thread::sleep(std::time::Duration::from_millis(120));
    }
    for (k, call) in calls.into_iter().enumerate() {
        let out = call.wait_with_output()?;
        assert_eq!(
            out.status.code(),
            Some(0),
            "hook call {k}: {}",
            describe(&out)
        );
    }
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    let made = c.journal_generation(1) - g0;
    assert!(
        (1..=3).contains(&made),
        "6 hook calls during slow commits made {made} generations: they must be grouped"
    );
    Ok(())
}

#[test]
fn unusual_but_valid_syntax_commits_on_both_paths() -> Result<()> {
    // Content the reviewers found a naive check would refuse: postalias drops backslashes and
    // quotes, Postfix folds non-ASCII keys with full case folding (Straße is stored strasse).
    let c = TestCluster::start("delta-syntax", 3)?;
    let mut aliases = String::from(
        "# aliases\nbs: \\root\nlist: \"|/usr/lib/sympa/bin/queue list@lists.example.org\"\n\
         inc: :include: /etc/mail/inc\n\"sp key\": someone@example.org\nmulti: a@x,\n  b@y\n",
    );
    for i in 0..300 {
        aliases.push_str(&format!("l{i}: \"|/usr/lib/sympa/bin/queue l{i}@x\"\n"));
    }
    let mut transport = String::from("Straße@example.org\tsmtp:a\nΣΑΣ@example.org\tsmtp:b\n");
    transport.push_str(&transport_table("lists.example.org", 0..300));
    for (table, builder, src) in [
        ("sympa_aliases", "postalias", &mut aliases),
        (TABLE, "postmap", &mut transport),
    ] {
        std::fs::write(shared(&c, table), &*src)?;
        let (code, r) = commit_table(&c, 1, table);
        assert_eq!(code, Some(0), "{table} full: {r}");
        assert_served(&c, table, builder, "hash", src)?;
        // A small change: the delta and the incremental build.
        src.push_str(if builder == "postalias" {
            "bs2: \\other\n"
        } else {
            "Ärger@example.org\tsmtp:c\n"
        });
        std::fs::write(shared(&c, table), &*src)?;
        let (code, r) = commit_table(&c, 2, table);
        assert_eq!(code, Some(0), "{table} delta: {r}");
        assert_eq!(r["delta_nodes"], 3, "{table}: {r}");
        assert_served(&c, table, builder, "hash", src)?;
        for i in 1..=3 {
            assert_eq!(
                deltas_since_full(&c, i, table),
                1,
                "node{i} {table}: built in place: {}",
                std::fs::read_to_string(c.log(i))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("full build"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    Ok(())
}

#[test]
fn a_crash_in_the_middle_of_an_incremental_build_aborts_and_heals() -> Result<()> {
    let mut c = TestCluster::start("delta-crash", 3)?;
    let mut src = transport_table("lists.example.org", 0..500);
    c.write_source(&src);
    assert_eq!(c.commit(1).status.code(), Some(0));
    let served = src.clone();
    c.kill_node(2);
    c.start_node_with(
        2,
        &[("FAILPOINTS", "participant::mid_incremental_build=panic")],
    )?;
    src.push_str("crash@lists.example.org\tsympa:crash@x\n");
    c.write_source(&src);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(1), "node2 died preparing: aborted ({r})");
    assert!(
        c.wait_exit(2, std::time::Duration::from_secs(10)).is_some(),
        "node2 crashed at the failpoint"
    );
    assert_served(&c, TABLE, "postmap", "hash", &served)?;
    c.start_node(2)?;
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 3, "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    assert!(
        c.staged_files(2).is_empty(),
        "node2 removed the half-built copy: {:?}",
        c.staged_files(2)
    );
    Ok(())
}

/// The spare copies of node2's live `.db` (`.<file>.txmap-spare-<id>.db`).
fn spares(c: &TestCluster, i: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(c.table_dir(i))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        n.to_string_lossy()
                            .starts_with(&format!(".{TABLE}.txmap-spare-"))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until node `i` has exactly one spare copy, and returns it.
fn one_spare(c: &TestCluster, i: usize) -> Result<PathBuf> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = spares(c, i);
        // Written, fsynced and complete: as big as the live `.db`.
        let live = std::fs::metadata(c.table_dir(i).join(format!("{TABLE}.db")))?.len();
        if s.len() == 1 && std::fs::metadata(&s[0]).is_ok_and(|m| m.len() == live) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if spares(c, i) == s {
                return Ok(s[0].clone());
            }
        }
        if std::time::Instant::now() > until {
            bail!("node{i}: no single finished spare copy: {s:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The builder started before the source is rebuilt is the one the change needs first: a
/// change that removes records starts `postmap -d -`. When the records removed hold no key
/// (the comment block before the first entry) it is stopped unused and `postmap -i` runs
/// instead; a change that removes and adds runs both. What is served is the full build's.
#[test]
fn the_builder_started_early_is_used_or_stopped() -> Result<()> {
    let c = TestCluster::start("delta-prestart", 3)?;
    let body = transport_table("lists.example.org", 0..2000);
    let mut src = format!("# sympa_transport, generation 1\n{body}");
    c.write_source(&src);
    assert_eq!(c.commit(1).status.code(), Some(0));
    let steps = [
        // The header comment changes and one entry is added: the dropped record has no key.
        (
            "# sympa_transport, generation 2\n".to_string(),
            "early1@lists.example.org\tsympa:early1@x\n",
            false,
        ),
        // One entry removed and one added.
        (
            "# sympa_transport, generation 2\n".to_string(),
            "early2@lists.example.org\tsympa:early2@x\n",
            true,
        ),
    ];
    for (n, (header, added, drop_one)) in steps.iter().enumerate() {
        for i in 1..=3 {
            one_spare(&c, i)?;
        }
        // Every line but the header, without the first entry when one is removed.
        let entries: String = src
            .lines()
            .skip(if *drop_one { 2 } else { 1 })
            .map(|l| format!("{l}\n"))
            .collect();
        src = format!("{header}{entries}{added}");
        c.write_source(&src);
        let (code, r) = c.commit_json(1);
        assert_eq!(code, Some(0), "step {n}: {r}");
        assert_eq!(r["delta_nodes"], 3, "step {n}: {r}");
        assert_served(&c, TABLE, "postmap", "hash", &src)?;
        for i in 1..=3 {
            assert_eq!(
                deltas_since_full(&c, i, TABLE),
                n as u64 + 1,
                "node{i} step {n}: built incrementally"
            );
            let log = std::fs::read_to_string(c.log(i))?;
            assert_eq!(
                log.matches("prestarted=true").count(),
                n + 1,
                "node{i} step {n}: the builder was started early: {log}"
            );
        }
    }
    Ok(())
}

/// The spare copy of the live `.db` (made once the table is idle) is what the next incremental
/// build starts from, only while neither it nor the live file changed; a changed one is removed
/// and the live file copied instead, and the result is the same. A restart removes every spare
/// (none is known valid) and makes a new one.
#[test]
fn the_spare_copy_is_used_only_while_unchanged() -> Result<()> {
    let mut c = TestCluster::start("delta-spare", 3)?;
    let mut src = transport_table("lists.example.org", 0..2000);
    c.write_source(&src);
    assert_eq!(c.commit(1).status.code(), Some(0));
    // Used: renamed to the staged name, so it is gone after the commit, and a new one is made.
    let first = one_spare(&c, 2)?;
    src.push_str("spare1@lists.example.org\tsympa:spare1@x\n");
    c.write_source(&src);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["delta_nodes"], 3, "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    let log2 = std::fs::read_to_string(c.log(2))?;
    assert!(
        log2.contains("from_spare=true prestarted=true"),
        "node2 used its spare, its builder started before the source was rebuilt: {log2}"
    );
    let second = one_spare(&c, 2)?;
    assert_ne!(first, second, "a new spare for the new live file");
    assert!(!first.exists());

    // Changed in place (one page overwritten, same size): not used, removed, and the build
    // copies the live file; what is served is still exactly the full build's.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&second)?;
        f.write_all_at(&[0xa5; 4096], 8192)?;
    }
    src.push_str("spare2@lists.example.org\tsympa:spare2@x\n");
    c.write_source(&src);
    let before = deltas_since_full(&c, 2, TABLE);
    let (code, r) = c.commit_json(1);
    assert_eq!(code, Some(0), "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    assert_eq!(
        deltas_since_full(&c, 2, TABLE),
        before + 1,
        "still incremental, from a fresh copy"
    );
    let log2 = std::fs::read_to_string(c.log(2))?;
    assert!(
        log2.contains("spare copy not used") && log2.contains("it changed since it was made"),
        "node2 says why: {log2}"
    );
    assert!(!second.exists(), "the changed spare is removed");

    // A restart removes a spare left behind (and anything planted under that shape) and makes
    // a new one from the live file.
    let third = one_spare(&c, 2)?;
    c.kill_node(2);
    let planted = c.table_dir(2).join(format!(
        ".{TABLE}.txmap-spare-{}.db",
        "0123456789abcdef0123456789abcdef"
    ));
    std::fs::write(&planted, b"not a table")?;
    c.start_node(2)?;
    let fourth = one_spare(&c, 2)?;
    assert!(!third.exists() && !planted.exists(), "{:?}", spares(&c, 2));
    assert_ne!(fourth, planted);
    src.push_str("spare3@lists.example.org\tsympa:spare3@x\n");
    c.write_source(&src);
    let (code, r) = c.commit_json(3);
    assert_eq!(code, Some(0), "{r}");
    assert_served(&c, TABLE, "postmap", "hash", &src)?;
    Ok(())
}
