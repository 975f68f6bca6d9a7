//! Guarantee 7 (closed): only cluster peers with a configured name may talk to a participant;
//! hostile or malformed requests are refused, logged, and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::sync::Arc;
use std::time::Duration;
use txmap_chaos_tests::cluster::{bins, transport_table, TestCluster, TABLE};
use txmap_common::config::Config;
use txmap_common::proto::{Prepare, Refusal, Request, Response, Sha256, TxId};

fn cluster_with_a_table(name: &str) -> TestCluster {
    let c = TestCluster::start(name, 3).unwrap();
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    c
}

/// Node `i`'s table directory, without the spare copy of the live `.db` (made in the
/// background once the table is idle, at a moment of its own).
fn listing(c: &TestCluster, i: usize) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(c.table_dir(i))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains(".txmap-spare-"))
        .collect();
    v.sort();
    v
}

/// A copy of node1's config with other TLS files (and optionally another node name).
fn impostor_config(
    c: &TestCluster,
    cert: &std::path::Path,
    key: &std::path::Path,
    name: Option<&str>,
) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(c.config(1)).unwrap();
    let cert_line = text
        .lines()
        .find(|l| l.starts_with("cert = "))
        .unwrap()
        .to_string();
    let key_line = text
        .lines()
        .find(|l| l.starts_with("key = "))
        .unwrap()
        .to_string();
    text = text.replace(&cert_line, &format!("cert = \"{}\"", cert.display()));
    text = text.replace(&key_line, &format!("key = \"{}\"", key.display()));
    if let Some(n) = name {
        text = text.replace("node = \"node1\"", &format!("node = \"{n}\""));
        // Its own address (check-config refuses a `listen` that is not the node's address).
        let listen_line = text
            .lines()
            .find(|l| l.starts_with("listen = "))
            .unwrap()
            .to_string();
        text = text.replace(&listen_line, "listen = \"127.0.0.1:9\"");
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{n}\"\naddress = \"127.0.0.1:9\"\n"
        ));
    }
    let p = c.dir.0.join("impostor.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn status_with(config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(&bins().txmap)
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .output()
        .unwrap()
}

fn wait_for_log(c: &TestCluster, i: usize, needle: &str) -> bool {
    txmap_chaos_tests::cluster::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(c.log(i))
            .unwrap_or_default()
            .contains(needle)
    })
}

#[test]
fn a_client_with_a_foreign_ca_certificate_is_refused() {
    let c = cluster_with_a_table("foreign");
    let foreign = c.dir.0.join("foreign-ca");
    txmap_common::tls::init_ca(&foreign).unwrap();
    let (cert, key) = txmap_common::tls::issue_node(&foreign, "node1", &foreign).unwrap();
    let cfg = impostor_config(&c, &cert, &key, None);
    let out = status_with(&cfg);
    assert_eq!(out.status.code(), Some(5));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|n| n["tables"].as_array().unwrap().is_empty()),
        "{v}"
    );
    assert!(
        wait_for_log(&c, 2, "refused connection"),
        "node2 did not log the refusal"
    );
}

#[test]
fn a_cluster_certificate_for_an_unconfigured_name_is_refused() {
    let c = cluster_with_a_table("intruder");
    let (cert, key) =
        txmap_common::tls::issue_node(&c.root().join("ca"), "intruder", &c.dir.0).unwrap();
    let cfg = impostor_config(&c, &cert, &key, Some("intruder"));
    let out = status_with(&cfg);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in v.as_array().unwrap() {
        assert!(n["tables"].as_array().unwrap().is_empty(), "{n}");
    }
    assert!(wait_for_log(&c, 1, "certificate names no configured node"));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(
    cfg: &Config,
    client: quinn::ClientConfig,
    node: usize,
) -> Result<quinn::Connection, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    let n = &cfg.nodes[node - 1];
    let conn = ep.connect(n.address, &n.name).map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())
}

#[test]
fn a_client_without_a_certificate_gets_nothing() {
    let c = cluster_with_a_table("nocert");
    let cfg = Config::load(&c.config(1)).unwrap();
    rt().block_on(async {
        let roots = rustls_roots(&cfg);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tls = tls;
        tls.alpn_protocols = vec![txmap_common::proto::ALPN.to_vec()];
        let qc = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        // TLS 1.3 may complete the client side before the server rejects: then the first
        // request must fail.
        if let Ok(conn) = connect(&cfg, qc, 2).await {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                txmap_common::net::exchange::<tokio::fs::File>(
                    &conn,
                    &Request::Status { table: None },
                    None,
                ),
            )
            .await;
            assert!(
                !matches!(r, Ok(Ok(Response::Status(_)))),
                "a client without certificate got a status: {r:?}"
            );
        }
    });
    assert!(wait_for_log(&c, 2, "refused connection"));
}

fn rustls_roots(cfg: &Config) -> rustls::RootCertStore {
    let pem = std::fs::read(&cfg.ca).unwrap();
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        store.add(cert.unwrap()).unwrap();
    }
    store
}

#[test]
fn hostile_requests_are_refused_and_change_nothing() {
    let c = cluster_with_a_table("hostile");
    let before: Vec<_> = (1..=3).map(|i| listing(&c, i)).collect();
    let gens = c.generations();
    let cfg = Config::load(&c.config(1)).unwrap();
    let client = txmap_common::tls::client_config(&cfg).unwrap();
    rt().block_on(async {
        let conn = connect(&cfg, client, 2).await.unwrap();
        let body = b"evil@x smtp:y\n".to_vec();
        let prepare = |table: &str, coordinator: &str, len: u64, sha: [u8; 32]| {
            Request::Prepare(Prepare {
                txid: TxId::random(),
                table: table.into(),
                generation: 99,
                coordinator: coordinator.into(),
                source_len: len,
                sha256: Sha256(sha),
                entries: 1,
                nodes: vec!["node1".into(), "node2".into(), "node3".into()],
                change: None,
            })
        };
        let sha = ring::digest::digest(&ring::digest::SHA256, &body);
        let sha: [u8; 32] = sha.as_ref().try_into().unwrap();
        let ask = |req: Request| {
            let conn = conn.clone();
            let body = body.clone();
            async move {
                txmap_common::net::exchange(&conn, &req, Some(&body[..]))
                    .await
                    .unwrap()
            }
        };
        // A table name that is a path.
        let r = ask(prepare("../../x", "node1", body.len() as u64, sha)).await;
        assert!(
            matches!(r, Response::Refused(Refusal::UnknownTable { .. })),
            "{r:?}"
        );
        // 2 GiB announced.
        let r = ask(prepare(TABLE, "node1", 2 << 30, sha)).await;
        assert!(
            matches!(r, Response::Refused(Refusal::TooLarge { .. })),
            "{r:?}"
        );
        // Pretending to be another coordinator.
        let r = ask(prepare(TABLE, "node3", body.len() as u64, sha)).await;
        assert!(
            matches!(r, Response::Refused(Refusal::NotAuthorized { .. })),
            "{r:?}"
        );
        // Content that does not match its announced sha256.
        let r = ask(prepare(TABLE, "node1", body.len() as u64, [7; 32])).await;
        assert!(
            matches!(r, Response::Refused(Refusal::ContentMismatch { .. })),
            "{r:?}"
        );
        // A frame header announcing 2 GiB, then garbage: refused before anything is allocated.
        for raw in [
            vec![1u8, 0x80, 0, 0, 0],
            vec![1u8, 0, 0, 0, 3, 0xff, 0xff, 0xff],
            vec![9u8, 0, 0, 0, 0],
        ] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&raw).await.unwrap();
            let _ = send.finish();
            let r: Response = txmap_common::codec::read_frame(&mut recv).await.unwrap();
            assert!(
                matches!(r, Response::Refused(Refusal::Protocol { .. })),
                "{raw:?}: {r:?}"
            );
        }
    });
    // Nothing was written anywhere, nothing is held, every node still answers.
    for i in 1..=3 {
        assert_eq!(
            listing(&c, i),
            before[i - 1],
            "node{i}'s table directory changed"
        );
        assert!(c.lock_free(i));
    }
    assert!(!c.root().join("x").exists() && !c.root().join("node2/x").exists());
    assert_eq!(c.generations(), gens);
}

/// Peak resident memory of a process (`VmHWM`, KiB).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `postmap` prints about 110 bytes of warning per bad line: a source of 300,000 bad lines
/// makes it print over 30 MiB. Every node refuses the build, naming the first lines, and no
/// txmapd holds more than a bounded part of that output (it kept all of it: 80 MiB peak here,
/// against about 22 MiB now).
#[test]
fn a_builder_that_prints_30_mib_of_warnings_costs_bounded_memory() {
    // postmap takes seconds to print that much: the prepare may take as long.
    let mut c = TestCluster::start_edited("hostile-stderr", 3, |_, t| {
        t.replace("prepare_ms = 5000", "prepare_ms = 60000\ntotal_ms = 90000")
    })
    .unwrap();
    c.write_source(&transport_table("a.example", 0..10));
    assert_eq!(c.commit(1).status.code(), Some(0));
    // Fresh daemons: their peak memory is this commit's.
    for i in 1..=3 {
        c.kill_node(i);
        c.start_node(i).unwrap();
    }
    let mut bad = String::with_capacity(4 << 20);
    for k in 0..300_000 {
        bad.push_str(&format!("bad{k}\n"));
    }
    c.write_source(&bad);
    let out = c.txmap(1, &["commit", TABLE, "--force"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("expected format"), "{text}");
    for i in 1..=3 {
        let kib = peak_rss_kib(c.pid(i).unwrap());
        assert!(kib > 0, "node{i}: no VmHWM");
        eprintln!("node{i}: txmapd peak RSS {kib} KiB");
        assert!(
            kib < 48 * 1024,
            "node{i}: txmapd peaked at {} MiB for a failed build",
            kib / 1024
        );
    }
}
