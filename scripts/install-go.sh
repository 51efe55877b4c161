#!/usr/bin/env bash
# Install Go and the sources of gRPC-go and etcd's client from Debian, for the
# gRPC interop test (tests/test_interop_grpc.py builds tests/interop/grpc_resolver
# with GOPATH=/usr/share/gocode GO111MODULE=off: no Go module proxy is needed).
#   golang-go               the go command (1.19 on bookworm)
#   golang-etcd-server-dev  etcd 3.4.23's sources: clientv3 and its gRPC naming resolver
#   golang-google-grpc-dev  grpc-go 1.33.3
# Idempotent: installs only what is missing. Prints what it found on stdout.
# Needs root (apt-get).
set -euo pipefail

GOCODE=/usr/share/gocode/src
RESOLVER=$GOCODE/go.etcd.io/etcd/clientv3/naming/resolver/resolver.go
GRPC=$GOCODE/google.golang.org/grpc/version.go

need=()
[[ -x /usr/bin/go ]] || command -v go >/dev/null 2>&1 || need+=(golang-go)
[[ -f $RESOLVER ]] || need+=(golang-etcd-server-dev)
[[ -f $GRPC ]] || need+=(golang-google-grpc-dev)

if ((${#need[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-go.sh: need root to install: ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "install-go.sh: installing ${need[*]}" >&2
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    # Another install running at the same time holds dpkg's lock: wait for it.
    lock=(-o DPkg::Lock::Timeout=300)
    if ! { apt-get update -q "${lock[@]}" \
            && apt-get install -y -q "${lock[@]}" --no-install-recommends "${need[@]}"; } \
            >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-go.sh: failed to install ${need[*]}" >&2
        exit 1
    fi
fi

go_bin=$(command -v go || echo /usr/bin/go)
grpc_version=$(sed -n 's/^const Version = "\(.*\)"/\1/p' "$GRPC")
etcd_version=$(dpkg-query -W -f '${Version}' golang-etcd-server-dev 2>/dev/null || echo "?")
echo "go: $go_bin ($("$go_bin" version | cut -d' ' -f3))"
echo "etcd resolver: $(dirname "$RESOLVER") (golang-etcd-server-dev $etcd_version)"
echo "grpc-go: $(dirname "$GRPC") ($grpc_version)"
