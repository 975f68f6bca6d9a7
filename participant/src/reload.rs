//! `SIGHUP` (`systemctl reload txmapd`): re-read the config without a restart.
//!
//! What takes effect: tables added or removed, `in_service` flags, timeouts, `postfix`
//! programs, `max_table_bytes`, `history_keep`, `max_shrink_percent`, `guard_free_keys`, sources. What needs a
//! restart, logged as such and kept at its old value until then: `node`, `listen`,
//! `state_dir`, the TLS files, the hook and probe sockets, and the settings of a table that
//! stays configured (its path, type, builder...: its state machine and lock belong to the old
//! settings). A config with a problem `txmapd` would refuse to start on is not applied at all:
//! the daemon keeps serving with the old one and logs every problem.

use crate::server::{open_slot, Live, Node};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{error, info, warn};
use txmap_common::config::{format_problems, Config};
use txmap_common::journal::Journal;
use txmap_coordinator::cluster::Cluster;

/// Re-reads the config file and swaps in a node built from it.
pub(crate) async fn reload(live: &Live) {
    let old = live.node();
    let path = old.cfg.file.clone();
    let (cfg, problems) = Config::check(&path);
    let Some(mut cfg) = cfg else {
        error!(
            "config not reloaded, txmapd keeps its current config: {}",
            format_problems(&path, &problems).replace('\n', ";")
        );
        return;
    };
    for p in &problems {
        warn!(problem = %p.text, "config (reloaded): {}", path.display());
    }
    let mut restart = Vec::new();
    let mut keep = |what: &str, changed: bool| {
        if changed {
            restart.push(what.to_string());
        }
    };
    keep("node", cfg.node != old.cfg.node);
    keep("listen", cfg.listen != old.cfg.listen);
    keep("state_dir", cfg.state_dir != old.cfg.state_dir);
    keep(
        "tls",
        (&cfg.ca, &cfg.cert, &cfg.key) != (&old.cfg.ca, &old.cfg.cert, &old.cfg.key),
    );
    keep("hook", cfg.hook != old.cfg.hook);
    keep("probe", cfg.probe != old.cfg.probe);
    cfg.node = old.cfg.node.clone();
    cfg.listen = old.cfg.listen;
    cfg.state_dir = old.cfg.state_dir.clone();
    cfg.ca = old.cfg.ca.clone();
    cfg.cert = old.cfg.cert.clone();
    cfg.key = old.cfg.key.clone();
    cfg.hook = old.cfg.hook.clone();
    cfg.probe = old.cfg.probe.clone();

    let journal = match Journal::open(&cfg.state_dir) {
        Ok(j) => j,
        Err(e) => {
            error!(error = %e, "config not reloaded: cannot open the journal");
            return;
        }
    };
    let mut slots = HashMap::new();
    let mut added = Vec::new();
    let mut tables = Vec::new();
    for t in &cfg.tables {
        match old.slots.get(&t.name) {
            Some(slot) => {
                if slot.table != *t {
                    restart.push(format!("table {}", t.name));
                }
                tables.push(slot.table.clone());
                slots.insert(t.name.clone(), slot.clone());
            }
            None => match open_slot(&cfg, &journal, t) {
                Ok(slot) => {
                    added.push(t.name.clone());
                    tables.push(t.clone());
                    slots.insert(t.name.clone(), slot);
                }
                Err(e) => {
                    error!(table = %t.name, error = %format!("{e:#}"), "config not reloaded: cannot open the new table");
                    return;
                }
            },
        }
    }
    let mut removed = Vec::new();
    for (name, slot) in &old.slots {
        if slots.contains_key(name) {
            continue;
        }
        if slot.state.lock().await.active.is_some() {
            warn!(table = %name, "table removed from the config but a transaction holds it: kept until it ends and txmapd restarts");
            tables.push(slot.table.clone());
            slots.insert(name.clone(), slot.clone());
        } else {
            removed.push(name.clone());
        }
    }
    cfg.tables = tables;
    let service: Vec<String> = cfg
        .nodes
        .iter()
        .filter(|n| {
            old.cfg
                .node_by_name(&n.name)
                .is_none_or(|o| o.in_service != n.in_service)
        })
        .map(|n| {
            format!(
                "{} {}",
                n.name,
                if n.in_service {
                    "in service"
                } else {
                    "out of service"
                }
            )
        })
        .collect();
    let timeouts_changed = cfg.timeouts != old.cfg.timeouts;
    let cluster = match Cluster::new(cfg.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!(error = %format!("{e:#}"), "config not reloaded: QUIC client setup failed");
            return;
        }
    };
    let node = Arc::new(Node {
        cfg,
        journal,
        slots,
    });
    live.swap(node, cluster);
    info!(
        added = %added.join(","),
        removed = %removed.join(","),
        service = %service.join(","),
        timeouts_changed,
        "config reloaded"
    );
    if !restart.is_empty() {
        warn!(
            "config reloaded, but changes to {} take effect only after a restart (systemctl restart txmapd); the old values stay in use",
            restart.join(", ")
        );
    }
}
