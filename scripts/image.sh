#!/usr/bin/env bash
# Build the registrar image with podman: registrar:<version> and registrar:latest.
# Run as root on Debian (bookworm). Idempotent:
#   - installs podman, runc and mmdebstrap from Debian when missing;
#   - makes the base image once ($REGISTRAR_IMAGE_BASE, default localhost/registrar-base:bookworm-*):
#     no image registry is reachable here, so the base is a bare bookworm (no apt) with python3,
#     python3-venv, passwd, ca-certificates and tzdata, bootstrapped by mmdebstrap from the Debian
#     mirror this machine is already configured with, and `podman import`ed;
#   - builds the Dockerfile on it (podman's layer cache makes a rebuild of unchanged sources quick).
# Prints the build seconds and the image size. On a machine that can pull
# python:3.11-slim-bookworm, `docker build .` needs none of this.
# Why runc and the ulimits: crun fails on this machine's hybrid cgroup layout, and podman's
# default nofile/nproc limits exceed the machine's hard limits.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR source=lib/apt-sources.sh
. scripts/lib/apt-sources.sh

SUITE=bookworm
# essential: Essential:yes packages and the ones named, no apt (129 MB -> 109 MB).
# merged-usr hook: without it bookworm pulls usrmerge and with it perl (~40 MB).
# tzdata: /etc/localtime (UTC), else tzlocal (APScheduler) warns at every start.
# Docs, man pages and translations are left out; copyright files stay.
# shellcheck disable=SC2054  # --include takes a comma-separated list
BASE_RECIPE=(--variant=essential --include=python3,python3-venv,passwd,ca-certificates,tzdata
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*')
# The tag names the recipe: a changed recipe makes a new base instead of reusing the old one.
BASE_IMAGE=${REGISTRAR_IMAGE_BASE:-localhost/registrar-base:$SUITE-$(
    printf '%s\n' "${BASE_RECIPE[@]}" | sha256sum | cut -c1-12)}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Options every podman build/run here needs (tests/test_image.py uses the same).
PODMAN_OPTS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

tmp=""
trap '[[ -z $tmp ]] || rm -rf "$tmp"' EXIT

log() { echo "image.sh: $*" >&2; }
die() { log "$*"; exit 1; }

install_tools() {
    local pkgs=()
    command -v podman >/dev/null 2>&1 || pkgs+=(podman)
    command -v runc >/dev/null 2>&1 || pkgs+=(runc)
    command -v mmdebstrap >/dev/null 2>&1 || pkgs+=(mmdebstrap)
    ((${#pkgs[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install ${pkgs[*]}"
    log "installing ${pkgs[*]}"
    local out
    out=$(mktemp)
    # uidmap: podman wants newuidmap/newgidmap; iptables/netavark come as its dependencies.
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends "${pkgs[@]}" uidmap; } >"$out" 2>&1; then
        cat "$out" >&2; rm -f "$out"
        die "failed to install ${pkgs[*]}"
    fi
    rm -f "$out"
}

# "main URI" and "security URI" of the Debian archive configured here (deb822 files first,
# then the one-line format): entries for the suite we bootstrap, or whose URI names debian
# (not a third-party repository); the security one may be empty.
mirror_uris() {
    apt_deb_sources | awk -v suite="$SUITE" '($2 ~ /debian/ || index($0, " " suite)) \
                                             && !seen[$1]++ { print $1, $2 }'
}

make_base() {
    podman image exists "$BASE_IMAGE" && return 0
    local uris main security began
    uris=$(mirror_uris)
    main=$(awk '$1 == "main" { print $2 }' <<<"$uris")
    security=$(awk '$1 == "security" { print $2 }' <<<"$uris")
    [[ -n $main ]] || die "no Debian mirror in /etc/apt/sources.list.d/*.sources or sources.list"
    local signed=""
    [[ -r $KEYRING ]] && signed="[signed-by=$KEYRING] "
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/registrar-base.XXXXXX")
    {
        echo "deb ${signed}$main $SUITE main"
        echo "deb ${signed}$main $SUITE-updates main"
        [[ -z $security ]] || echo "deb ${signed}$security $SUITE-security main"
    } >"$tmp/sources.list"
    log "making $BASE_IMAGE with mmdebstrap from $main (once; cached in podman's storage)"
    began=$(date +%s.%N)
    if ! mmdebstrap --quiet "${BASE_RECIPE[@]}" \
            "$SUITE" "$tmp/base.tar" "$tmp/sources.list" >"$tmp/log" 2>&1; then
        cat "$tmp/log" >&2
        die "mmdebstrap failed"
    fi
    podman import --quiet --change 'CMD ["python3"]' "$tmp/base.tar" "$BASE_IMAGE" >/dev/null
    log "base made in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $began }") s"
}

build() {
    local version revision began secs size base_size
    version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' registrar/_version.py)
    [[ -n $version ]] || die "no __version__ in registrar/_version.py"
    revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    local mounts=()
    # pip in the build reaches PyPI through whatever this machine trusts (a proxy's CA
    # included): lend the host's CA bundle to the build, read-only; it is not in the image.
    [[ -r /etc/ssl/certs/ca-certificates.crt ]] && \
        mounts=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    began=$(date +%s.%N)
    podman build "${PODMAN_OPTS[@]}" "${mounts[@]}" --quiet \
        --build-arg BASE="$BASE_IMAGE" --build-arg VERSION="$version" \
        --build-arg REVISION="$revision" \
        --tag "registrar:$version" --tag registrar:latest . >/dev/null
    secs=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $began }")
    size=$(podman image inspect --format '{{.Size}}' "registrar:$version")
    base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
    echo "registrar:$version built in $secs s: $((size / 1000000)) MB ($size bytes)," \
        "$(((size - base_size) / 1000000)) MB over $BASE_IMAGE"
}

install_tools
make_base
build
