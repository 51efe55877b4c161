#!/usr/bin/env bash
# Install the etcd server/client and nftables (for fault injection) from Debian.
# Idempotent: a no-op when everything is already there. Run as root.
set -euo pipefail

pkgs=()
if [[ ! -x /usr/bin/etcd || ! -x /usr/bin/etcdctl ]]; then
    pkgs+=(etcd-server etcd-client)
fi
if ! command -v nft >/dev/null 2>&1 && [[ ! -x /usr/sbin/nft ]]; then
    pkgs+=(nftables)
fi
((${#pkgs[@]} == 0)) && exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "install-etcd.sh: need root to install ${pkgs[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-etcd.sh: failed to install ${pkgs[*]}" >&2
    exit 1
fi
