//! `txmap diff` and `txmap commit --dry-run`: what a commit would change, key by key.
//!
//! Entries are read as the builders read them: `#` comments and blank lines skipped, a line
//! starting with whitespace continues the previous entry; the key is the first word
//! (`postalias`: without its trailing `:`). Pure functions of two texts, tested below.

use serde::Serialize;
use std::collections::BTreeMap;
use txmap_common::config::Builder;

/// Keys and their values, as the builder would see them.
pub fn entries(text: &str, builder: Builder) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| out.get_mut(k)) {
                v.push(' ');
                v.push_str(trimmed);
            }
            continue;
        }
        let (k, v) = match builder {
            Builder::Postalias => trimmed
                .split_once(':')
                .map(|(k, v)| (k.trim(), v.trim()))
                .unwrap_or((trimmed, "")),
            Builder::Postmap => trimmed
                .split_once(char::is_whitespace)
                .map(|(k, v)| (k, v.trim()))
                .unwrap_or((trimmed, "")),
        };
        out.insert(k.to_string(), v.to_string());
        last = Some(k.to_string());
    }
    out
}

/// What changes from `old` to `new`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Diff {
    /// Keys only in the new content, with their values.
    pub added: Vec<(String, String)>,
    /// Keys only in the old content, with their values.
    pub removed: Vec<(String, String)>,
    /// Keys in both with another value: key, old, new.
    pub changed: Vec<(String, String, String)>,
    /// Keys with the same value.
    pub unchanged: usize,
}

impl Diff {
    /// Compares two contents.
    pub fn of(old: &str, new: &str, builder: Builder) -> Diff {
        let (a, b) = (entries(old, builder), entries(new, builder));
        let mut d = Diff::default();
        for (k, v) in &b {
            match a.get(k) {
                None => d.added.push((k.clone(), v.clone())),
                Some(o) if o != v => d.changed.push((k.clone(), o.clone(), v.clone())),
                Some(_) => d.unchanged += 1,
            }
        }
        for (k, v) in &a {
            if !b.contains_key(k) {
                d.removed.push((k.clone(), v.clone()));
            }
        }
        d
    }

    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// The summary line and the first `n` lines of each kind.
    pub fn render(&self, n: usize) -> String {
        let mut s = format!(
            "{} added, {} removed, {} changed, {} unchanged\n",
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.unchanged
        );
        for (k, v) in self.added.iter().take(n) {
            s.push_str(&format!("+ {k} {v}\n"));
        }
        if self.added.len() > n {
            s.push_str(&format!("+ ... {} more\n", self.added.len() - n));
        }
        for (k, v) in self.removed.iter().take(n) {
            s.push_str(&format!("- {k} {v}\n"));
        }
        if self.removed.len() > n {
            s.push_str(&format!("- ... {} more\n", self.removed.len() - n));
        }
        for (k, o, v) in self.changed.iter().take(n) {
            s.push_str(&format!("~ {k} {o} -> {v}\n"));
        }
        if self.changed.len() > n {
            s.push_str(&format!("~ ... {} more\n", self.changed.len() - n));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_removed_and_changed_keys_are_told_apart() {
        let old = "# t\na x\nb y\nc z\n  continued\n";
        let new = "a x\nb Y\nd w\n";
        let d = Diff::of(old, new, Builder::Postmap);
        assert_eq!(d.added, vec![("d".into(), "w".into())]);
        assert_eq!(d.removed, vec![("c".into(), "z continued".into())]);
        assert_eq!(d.changed, vec![("b".into(), "y".into(), "Y".into())]);
        assert_eq!(d.unchanged, 1);
        assert!(d
            .render(10)
            .starts_with("1 added, 1 removed, 1 changed, 1 unchanged\n"));
        let aliases = Diff::of("l: a\n", "l: b\n", Builder::Postalias);
        assert_eq!(aliases.changed.len(), 1);
        assert!(Diff::of(old, old, Builder::Postmap).is_empty());
    }
}
