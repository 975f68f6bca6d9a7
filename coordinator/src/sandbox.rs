//! `txmap sandbox DIR --nodes N`: a ready N-node cluster on 127.0.0.1, for the quick start,
//! the demo and the tests.
//!
//! ```text
//! DIR/ca/ca.pem, ca.key            cluster CA
//! DIR/shared/sympa_transport       the sources all nodes share (stand in for Sympa's disk):
//! DIR/shared/sympa_aliases           a postmap table and a postalias table
//! DIR/<node>/txmap.toml            the node's config
//! DIR/<node>/tls/<node>.pem, .key  the node's certificate
//! DIR/<node>/state/                journal, locks, decision log
//! DIR/<node>/postfix/              live table + main.cf (postmap's -c directory)
//! ```

use anyhow::Context as _;
use std::path::{Path, PathBuf};

/// Writes the sandbox and returns the config path of every node.
pub fn create(dir: &Path, nodes: usize, base_port: u16) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(
        (1..=32).contains(&nodes),
        "--nodes must be between 1 and 32"
    );
    anyhow::ensure!(
        (base_port as usize) + nodes <= 65535 && base_port >= 1024,
        "--base-port must leave room for {nodes} ports between 1024 and 65535"
    );
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not empty; choose a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let ca = dir.join("ca");
    txmap_common::tls::init_ca(&ca)?;
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    let source = shared.join("sympa_transport");
    std::fs::write(
        &source,
        "# sympa_transport, as Sympa writes it (sandbox)\nsympa@lists.example.org sympa:sympa@lists.example.org\n",
    )?;
    let aliases = shared.join("sympa_aliases");
    std::fs::write(
        &aliases,
        "# sympa_aliases, as Sympa writes it (sandbox)\nsympa: \"| /usr/lib/sympa/bin/queue sympa@lists.example.org\"\n",
    )?;
    let names: Vec<String> = (1..=nodes).map(|i| format!("node{i}")).collect();
    let mut nodes_toml = String::new();
    for (i, n) in names.iter().enumerate() {
        nodes_toml.push_str(&format!(
            "\n[[nodes]]\nname = \"{n}\"\naddress = \"127.0.0.1:{}\"\n",
            base_port as usize + i
        ));
    }
    let mut configs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let nd = dir.join(n);
        let tls = nd.join("tls");
        txmap_common::tls::issue_node(&ca, n, &tls)?;
        let postfix = nd.join("postfix");
        std::fs::create_dir_all(&postfix)?;
        std::fs::create_dir_all(nd.join("state"))?;
        // An empty main.cf: postmap/postalias need one, and this keeps the sandbox independent
        // of the machine's /etc/postfix.
        std::fs::write(postfix.join("main.cf"), "")?;
        // Postfix programs wait (polling, about 2 s) until a main.cf is over a second old.
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(postfix.join("main.cf"))?
            .set_modified(past)?;
        std::fs::copy(&source, postfix.join("sympa_transport"))?;
        std::fs::copy(&aliases, postfix.join("sympa_aliases"))?;
        let text = format!(
            "# txmap config of {n} (written by `txmap sandbox`)\n\
             node = \"{n}\"\n\
             state_dir = \"{state}\"\n\
             listen = \"127.0.0.1:{port}\"\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
             [postfix]\nconfig_dir = \"{postfix}\"\n\n\
             # The Sympa hook's socket. Sandbox: anyone on this machine may ask. Production:\n\
             # group = \"sympa\" and mode = \"0660\".\n\
             [hook]\nmode = \"0666\"\n\n\
             [timeouts]\nconnect_ms = 1500\nprepare_ms = 5000\ncommit_ms = 2000\n\
             {nodes_toml}\n\
             [[tables]]\nname = \"sympa_transport\"\npath = \"{live}\"\nsource = \"{source}\"\ntype = \"hash\"\nbuilder = \"postmap\"\n\n\
             [[tables]]\nname = \"sympa_aliases\"\npath = \"{alive}\"\nsource = \"{asource}\"\ntype = \"hash\"\nbuilder = \"postalias\"\n",
            state = nd.join("state").display(),
            port = base_port as usize + i,
            ca = ca.join("ca.pem").display(),
            cert = tls.join(format!("{n}.pem")).display(),
            key = tls.join(format!("{n}.key")).display(),
            postfix = postfix.display(),
            live = postfix.join("sympa_transport").display(),
            source = source.display(),
            alive = postfix.join("sympa_aliases").display(),
            asource = aliases.display(),
        );
        let cfg_path = nd.join("txmap.toml");
        std::fs::write(&cfg_path, text)?;
        // Build the initial (generation 0) table so Postfix could use it at once.
        let cfg = txmap_common::config::Config::load(&cfg_path)?;
        if cfg.postfix.postmap.is_file() {
            let st = std::process::Command::new(&cfg.postfix.postmap)
                .arg("-c")
                .arg(&postfix)
                .arg(format!(
                    "hash:{}",
                    postfix.join("sympa_transport").display()
                ))
                .status()?;
            anyhow::ensure!(st.success(), "postmap of the initial table failed on {n}");
            let st = std::process::Command::new(&cfg.postfix.postalias)
                .arg("-c")
                .arg(&postfix)
                .arg(format!("hash:{}", postfix.join("sympa_aliases").display()))
                .status()?;
            anyhow::ensure!(
                st.success(),
                "postalias of the initial aliases failed on {n}"
            );
        }
        configs.push(cfg_path);
    }
    Ok(configs)
}
