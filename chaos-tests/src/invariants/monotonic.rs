//! Ordered (guarantee 4): on every node the live generation only grows, in the journal sampled
//! over time and in the `status` answers asked over time; and one generation is one
//! transaction with one content everywhere (two coordinators racing never install two
//! different contents under the same number).

use super::journal::{JournalLog, Live};
use super::Tally;

/// Invariant name.
pub const NAME: &str = "generations only grow";

fn sequence(t: &mut Tally, node: usize, what: &str, list: &[Live], cuts: &[(u64, u64)]) {
    for w in list.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if cuts
            .iter()
            .any(|(from, to)| a.at_ms <= *to && b.at_ms >= *from)
        {
            // A power cut between the two: the first may never have been durable.
            continue;
        }
        t.check(b.generation >= a.generation, NAME, b.at_ms, || {
            format!(
                "node{node}: {what} generation went from {} (at {:.1} s) down to {}",
                a.generation,
                a.at_ms as f64 / 1000.0,
                b.generation
            )
        });
        if b.generation == a.generation && a.generation > 0 {
            t.check(
                a.sha256 == b.sha256 && a.txid == b.txid,
                NAME,
                b.at_ms,
                || {
                    format!(
                        "node{node}: {what} generation {} changed content without a new number ({:?}/{:?} -> {:?}/{:?})",
                        a.generation, a.txid, a.sha256, b.txid, b.sha256
                    )
                },
            );
        }
    }
}

/// Checks every node's sequences and every generation's claims.
pub fn check(log: &JournalLog, end_ms: u64) -> Tally {
    let mut t = Tally::default();
    for (i, n) in log.nodes.iter().enumerate() {
        sequence(&mut t, i + 1, "journal", &n.journal, &n.cuts);
        sequence(&mut t, i + 1, "status", &n.status, &n.cuts);
    }
    for (g, claims) in log.generation_claims() {
        let mut shas: Vec<&String> = claims.iter().filter_map(|c| c.sha256.as_ref()).collect();
        shas.sort();
        shas.dedup();
        let mut txids: Vec<&String> = claims.iter().filter_map(|c| c.txid.as_ref()).collect();
        txids.sort();
        txids.dedup();
        t.check(shas.len() <= 1 && txids.len() <= 1, NAME, end_ms, || {
            let who: Vec<String> = claims
                .iter()
                .map(|c| {
                    format!(
                        "node{}/{}: txid {} sha {}",
                        c.node,
                        c.source,
                        c.txid.as_deref().unwrap_or("-"),
                        c.sha256
                            .as_deref()
                            .map(|s| &s[..12.min(s.len())])
                            .unwrap_or("-")
                    )
                })
                .collect();
            format!(
                "generation {g} has {} contents and {} transactions: {}",
                shas.len(),
                txids.len(),
                who.join("; ")
            )
        });
    }
    t
}
