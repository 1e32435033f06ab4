#!/usr/bin/env bash
# What hosts-on-one-machine (scripts/cluster.py) need beyond `make setup`: iproute2 (ip, tc),
# util-linux (unshare), openssh-server (sshd; the image blocks service starts, so no system
# sshd appears -- the cluster starts its own, one per host) and nftables (nft: the lossy-link
# profiles, e.g. bench_cluster.py --preset lossy; nothing else needs it). Installs with apt-get when run as
# root; elsewhere it says what is missing and exits 0, and the tests that need hosts skip.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 || need+=(openssh-server openssh-client)
command -v nft >/dev/null 2>&1 || need+=(nftables)
if [ ${#need[@]} -eq 0 ]; then
  echo "[setup-cluster] ip, tc, unshare, sshd, nft present"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup-cluster] missing ${need[*]} and cannot install here (needs root and apt-get);" \
       "tests across hosts will skip" >&2
  exit 0
fi
echo "[setup-cluster] installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
