#!/usr/bin/env bash
# Installs what txmap's demo and tests need on a fresh Debian machine: Postfix's postmap and
# postalias (with the cdb and lmdb map types). Idempotent; needs root (or sudo) only when
# something is missing. Never prompts: debconf is preseeded to "No configuration".
set -euo pipefail

need=()
command -v postmap >/dev/null 2>&1 || need+=(postfix)
[ -e /usr/lib/postfix/postfix-cdb.so ] || need+=(postfix-cdb)
[ -e /usr/lib/postfix/postfix-lmdb.so ] || need+=(postfix-lmdb)
# The package test (chaos-tests/tests/package.rs) installs the .deb into a debootstrap root.
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3) # the power-loss tests' FUSE mounts
# Clocks moved from outside the binaries (tests/lost_change.rs).
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need+=(libfaketime)
if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}" >&2
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  echo "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    postfix postfix-cdb postfix-lmdb debootstrap fuse3 libfaketime </dev/null >/dev/null
fi
command -v postmap >/dev/null || { echo "setup: postmap still missing" >&2; exit 1; }
# The dedicated user the tests run txmapd as (tests/privilege.rs, and the whole suite with
# TXMAP_TEST_DAEMON_USER=txmap-test): no home, no login, a member of `nogroup` (the hook
# socket's group in the tests). Only as root: as a normal user those tests are skipped.
if [ "$(id -u)" -eq 0 ]; then
  id -u txmap-test >/dev/null 2>&1 ||
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin txmap-test
  id -nG txmap-test | tr ' ' '\n' | grep -qx nogroup || usermod -aG nogroup txmap-test
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is missing; install it with rustup" >&2; exit 1; }
