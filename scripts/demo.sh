#!/usr/bin/env bash
# The txmap demo: a 3-node cluster on 127.0.0.1, a real two-phase commit of a 20,000-line
# Sympa transport table with Debian's postmap, then status and lookups on every node.
# Usage: scripts/demo.sh [DIR]   (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet --bins
bin=target/release
dir=${1:-$(mktemp -d /tmp/txmap-demo.XXXXXX)}
rmdir "$dir" 2>/dev/null || true
port=$((17000 + RANDOM % 2000))

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== txmap sandbox: 3 nodes, CA and certificates, in $dir"
$bin/txmap sandbox "$dir" --nodes 3 --base-port "$port" >/dev/null
for i in 1 2 3; do
  $bin/txmapd --config "$dir/node$i/txmap.toml" 2>"$dir/node$i/txmapd.log" &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do grep -q "txmapd ready" "$dir/node$i/txmapd.log" 2>/dev/null && break; sleep 0.05; done
done

echo "== Sympa writes a 20,000-list transport table to $dir/shared/sympa_transport"
{ echo "# sympa_transport"; for i in $(seq 0 19999); do printf 'list%d@lists.example.org\tsympa:list%d@lists.example.org\n' "$i" "$i"; done; } \
  > "$dir/shared/sympa_transport"

echo "== txmap commit sympa_transport (through node1)"
$bin/txmap --config "$dir/node1/txmap.toml" commit sympa_transport

echo "== txmap status"
$bin/txmap --config "$dir/node1/txmap.toml" status

echo "== postmap -q on every node"
for i in 1 2 3; do
  printf 'node%d: list19999@lists.example.org -> %s\n' "$i" \
    "$(postmap -c "$dir/node$i/postfix" -q list19999@lists.example.org "hash:$dir/node$i/postfix/sympa_transport")"
done

echo "== a node down: node3 stopped, the commit aborts everywhere and names it"
kill "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
echo "list-new@lists.example.org	sympa:list-new@lists.example.org" >> "$dir/shared/sympa_transport"
set +e
$bin/txmap --config "$dir/node1/txmap.toml" commit sympa_transport
echo "exit code $? (1 = aborted, nothing changed)"
set -e
printf 'node1 still serves the previous table: list-new -> %s\n' \
  "$(postmap -c "$dir/node1/postfix" -q list-new@lists.example.org "hash:$dir/node1/postfix/sympa_transport" || echo 'not found (as expected)')"
echo "demo done; files are in $dir"
