//! Small line-based edits of a node's `txmap.toml` (the sandbox writes a simple layout): set a
//! key in a section, point a `[[nodes]]` entry at another address.

/// Sets `key = value` (value written as given: quote strings yourself) at the top level
/// (`section == None`, inserted before the first header) or in `[section]` (appended as a
/// new section when missing). An existing line for the key is replaced.
pub fn set_key(text: &str, section: Option<&str>, key: &str, value: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str| l.trim_start().starts_with('[');
    let is_key = |l: &str| {
        let l = l.trim_start();
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let new_line = format!("{key} = {value}");
    let (start, end) = match section {
        None => (
            0,
            lines
                .iter()
                .position(|l| is_header(l))
                .unwrap_or(lines.len()),
        ),
        Some(s) => {
            let header = format!("[{s}]");
            match lines.iter().position(|l| l.trim() == header) {
                None => {
                    let mut out = text.to_string();
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str(&format!("\n{header}\n{new_line}\n"));
                    return out;
                }
                Some(h) => {
                    let end = lines[h + 1..]
                        .iter()
                        .position(|l| is_header(l))
                        .map(|p| h + 1 + p)
                        .unwrap_or(lines.len());
                    (h + 1, end)
                }
            }
        }
    };
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match (start..end).find(|i| is_key(lines[*i])) {
        Some(i) => out[i] = new_line,
        None => out.insert(start, new_line),
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// Sets the `address` of the `[[nodes]]` entry named `name`.
pub fn set_node_address(text: &str, name: &str, address: &str) -> String {
    set_node_key(text, name, "address", &format!("\"{address}\""))
}

/// Sets `key = value` (`value` as TOML, e.g. `false` or `"x"`) in the `[[nodes]]` entry named
/// `name`.
pub fn set_node_key(text: &str, name: &str, key: &str, value: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "[[nodes]]" {
            i += 1;
            continue;
        }
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with('['))
            .map(|p| i + 1 + p)
            .unwrap_or(lines.len());
        let named = (i + 1..end).any(|j| {
            let l = lines[j].trim();
            l.strip_prefix("name")
                .and_then(|r| r.trim_start().strip_prefix('='))
                .is_some_and(|v| v.trim().trim_matches('"') == name)
        });
        if named {
            let line = format!("{key} = {value}");
            let off = out.len() - lines.len();
            match (i + 1..end).find(|j| {
                lines[*j]
                    .trim_start()
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            }) {
                Some(j) => out[j + off] = line,
                None => out.insert(i + 1 + off, line),
            }
        }
        i = end;
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# c\nnode = \"node1\"\n\n[postfix]\nconfig_dir = \"/x\"\n\n[timeouts]\nconnect_ms = 1500\nprepare_ms = 5000\n\n[[nodes]]\nname = \"node1\"\naddress = \"127.0.0.1:1000\"\n\n[[nodes]]\nname = \"node2\"\naddress = \"127.0.0.1:1001\"\n\n[[tables]]\nname = \"t\"\n";

    #[test]
    fn edits_keys_sections_and_node_addresses() {
        let s = set_key(SAMPLE, Some("timeouts"), "connect_ms", "900");
        assert!(s.contains("connect_ms = 900\nprepare_ms = 5000"), "{s}");
        let s = set_key(&s, Some("timeouts"), "in_doubt_ms", "4000");
        assert!(s.contains("[timeouts]\nin_doubt_ms = 4000\n"), "{s}");
        let s = set_key(&s, Some("postfix"), "postmap", "\"/bin/false\"");
        assert!(
            s.contains("[postfix]\npostmap = \"/bin/false\"\nconfig_dir"),
            "{s}"
        );
        let s = set_key(&s, None, "history_keep", "100");
        assert!(s.starts_with("history_keep = 100\n# c\n"), "{s}");
        let s = set_node_address(&s, "node2", "127.0.0.1:5555");
        assert!(
            s.contains("name = \"node2\"\naddress = \"127.0.0.1:5555\""),
            "{s}"
        );
        assert!(
            s.contains("name = \"node1\"\naddress = \"127.0.0.1:1000\""),
            "{s}"
        );
        let s = set_node_key(&s, "node1", "in_service", "false");
        assert!(
            s.contains("[[nodes]]\nin_service = false\nname = \"node1\"\naddress"),
            "{s}"
        );
        let s = set_node_key(&s, "node1", "in_service", "true");
        assert!(
            s.contains("[[nodes]]\nin_service = true\nname = \"node1\""),
            "{s}"
        );
        let s = set_key(&s, Some("hook"), "mode", "\"0666\"");
        assert!(s.ends_with("\n[hook]\nmode = \"0666\"\n"), "{s}");
    }
}
