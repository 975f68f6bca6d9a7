//! Operator-facing text of the wire and machine types: what a log line or an error message
//! says about an answer, an outcome, a verdict or an event, in words (never Rust `Debug`).
//! The `Display` impls live here, beside their types' crate, so that `proto`, `machine` and
//! `decision` stay about the protocol.

use crate::decision::Verdict;
use crate::machine::Event;
use crate::proto::{OutcomeAnswer, Response};
use std::fmt;

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Commit => "commit",
            Verdict::Abort => "abort",
        })
    }
}

impl fmt::Display for OutcomeAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutcomeAnswer::Committed { generation } => {
                write!(f, "committed (generation {generation})")
            }
            OutcomeAnswer::Aborted => f.write_str("aborted"),
            OutcomeAnswer::InDoubt => f.write_str("in doubt (prepared, no decision known)"),
            OutcomeAnswer::Pending => f.write_str("pending (its coordinator is still at work)"),
            OutcomeAnswer::Unknown => f.write_str("unknown (not held, nothing recorded)"),
        }
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Status(t) => write!(f, "a status of {} table(s)", t.len()),
            Response::Prepared { txid } => write!(f, "prepared {txid}"),
            Response::Committed { txid, generation } => {
                write!(f, "committed {txid} (generation {generation})")
            }
            Response::Aborted { txid } => write!(f, "aborted {txid}"),
            Response::Outcome(o) => write!(f, "outcome: {o}"),
            Response::History(h) => write!(f, "a history of {} generation(s)", h.len()),
            Response::Source { len, .. } => write!(f, "a source of {len} bytes"),
            Response::Verified {
                generation,
                problems,
            } if problems.is_empty() => write!(f, "verified generation {generation}: ok"),
            Response::Verified {
                generation,
                problems,
            } => write!(
                f,
                "verified generation {generation}: {}",
                problems.join("; ")
            ),
            Response::Refused(r) => write!(f, "refused: {r}"),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Prepare {
                txid, generation, ..
            } => write!(f, "prepare {txid} (generation {generation})"),
            Event::StageDone { txid } => write!(f, "staging done for {txid}"),
            Event::StageFailed { txid, why } => write!(f, "staging failed for {txid}: {why}"),
            Event::Commit { txid, generation } => {
                write!(f, "commit {txid} (generation {generation})")
            }
            Event::InstallDone { txid } => write!(f, "install done for {txid}"),
            Event::InstallFailed { txid, why } => write!(f, "install failed for {txid}: {why}"),
            Event::Abort { txid, generation } => {
                write!(f, "abort {txid} (generation {generation})")
            }
            Event::Query {
                txid, generation, ..
            } => write!(f, "outcome query for {txid} (generation {generation})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Refusal, TxId};

    #[test]
    fn answers_read_as_words_not_rust_syntax() {
        let txid = TxId(0xab);
        let texts = [
            Response::Committed {
                txid,
                generation: 7,
            }
            .to_string(),
            Response::Outcome(OutcomeAnswer::InDoubt).to_string(),
            Response::Refused(Refusal::NotAuthorized {
                detail: "node4 is out of service".into(),
            })
            .to_string(),
            Event::Abort {
                txid,
                generation: 3,
            }
            .to_string(),
            Verdict::Commit.to_string(),
        ];
        for t in &texts {
            assert!(!t.contains('{') && !t.contains("InDoubt"), "{t}");
        }
        assert_eq!(texts[1], "outcome: in doubt (prepared, no decision known)");
        assert_eq!(texts[4], "commit");
    }
}
