#!/usr/bin/env bash
# Makes (once) and caches a clean Debian root for the package test
# (chaos-tests/tests/package.rs): `debootstrap --variant=minbase --include=postfix,systemd,procps`
# (a mail node: Postfix for postmap, systemd and procps for `systemd-analyze verify --root` of
# the unit) of the host's release from the host's Debian mirror, packed as a tarball. Later
# runs reuse the tarball. Needs root and debootstrap (scripts/setup.sh installs it).
#
#   scripts/package/debian-root.sh TARBALL
#
# Environment: TXMAP_DEBIAN_SUITE (default: the host's VERSION_CODENAME), TXMAP_DEBIAN_MIRROR
# (default: the first http(s) Debian URI in the host's apt sources, else deb.debian.org).
# Exit 0 with TARBALL in place; non-zero with a message naming the cause otherwise.
set -euo pipefail

out=${1:?usage: debian-root.sh TARBALL}
[ -s "$out" ] && exit 0
[ "$(id -u)" -eq 0 ] || { echo "debian-root: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null ||
  { echo "debian-root: debootstrap is missing; run scripts/setup.sh" >&2; exit 1; }

suite=${TXMAP_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
[ -n "$suite" ] || { echo "debian-root: cannot tell the Debian release; set TXMAP_DEBIAN_SUITE" >&2; exit 1; }
mirror=${TXMAP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

work=$(mktemp -d "$(dirname "$out")/.debian-root.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
root="$work/root"
echo "debian-root: debootstrap --variant=minbase --include=postfix,systemd,procps $suite from $mirror (once; cached in $out)" >&2
# Postfix's postinst asks debconf: "No configuration" leaves main.cf alone and starts nothing.
if ! DEBIAN_FRONTEND=noninteractive debootstrap --variant=minbase --include=postfix,systemd,procps \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 </dev/null; then
  tail -n 20 "$work/debootstrap.log" >&2
  [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 20 "$root/debootstrap/debootstrap.log" >&2
  echo "debian-root: debootstrap of $suite from $mirror failed (no network or no mirror?); see above" >&2
  exit 1
fi
chroot "$root" /usr/sbin/postmap -V >/dev/null 2>&1 || chroot "$root" test -x /usr/sbin/postmap ||
  { echo "debian-root: postfix is not installed in the root" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -cf "$work/root.tar" .
mv "$work/root.tar" "$out"
echo "debian-root: $out ready" >&2
