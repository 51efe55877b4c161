#!/usr/bin/env bash
# Fetch Consul 1.8.7 for the test suite: Debian bullseye's `consul` package,
# downloaded from the Debian mirror this machine is already configured with,
# under a throw-away apt configuration, and unpacked into a cache directory.
# Idempotent; prints the path of the consul binary on stdout (logs on stderr).
# Environment: CONSUL_BIN (use this binary), REGISTRAR_CACHE (cache root).
set -euo pipefail

CONSUL_VERSION=1.8.7
SUITE=bullseye
CACHE_ROOT="${REGISTRAR_CACHE:-$HOME/.cache/registrar}"
DEST="$CACHE_ROOT/consul-$CONSUL_VERSION"
CACHED_BIN="$DEST/usr/bin/consul"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# shellcheck source-path=SCRIPTDIR source=lib/apt-sources.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt-sources.sh"
log() { echo "install-consul: $*" >&2; }

if [[ -n "${CONSUL_BIN:-}" && -x "${CONSUL_BIN}" ]]; then
    echo "$CONSUL_BIN"; exit 0
fi
if path_bin="$(command -v consul 2>/dev/null)"; then
    echo "$path_bin"; exit 0
fi
if [[ -x "$CACHED_BIN" ]]; then
    echo "$CACHED_BIN"; exit 0
fi

# The URI of the main Debian archive (not -security / -updates) already
# configured here: deb822 files first, then the one-line format.
mirror_uri() {
    apt_deb_sources | awk '$1 == "main" && $2 !~ /security/ { print $2 }'
}

URI="$(mirror_uri | head -n1)"
if [[ -z "$URI" ]]; then
    log "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    exit 1
fi
log "fetching consul $CONSUL_VERSION from suite $SUITE of the configured mirror $URI"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/install-consul.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
# apt drops to the _apt user for downloads when run as root; let it in.
chmod 755 "$TMP"
mkdir -p "$TMP/lists/partial" "$TMP/cache/archives/partial" "$TMP/download"
if [[ $EUID -eq 0 ]] && id _apt >/dev/null 2>&1; then
    chown _apt "$TMP/lists/partial" "$TMP/cache/archives/partial" "$TMP/download"
fi

signed_by=""
[[ -r "$KEYRING" ]] && signed_by="[signed-by=$KEYRING] "
echo "deb ${signed_by}${URI} ${SUITE} main" > "$TMP/sources.list"
# Hooks configured for the system's `apt-get update` (appstream, packagekit)
# would act on the system's own state: drop them for this private run.
cat > "$TMP/apt.conf" <<'EOF'
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
EOF

APT_OPTS=(
    -c "$TMP/apt.conf"
    -o "Dir::Etc::sourcelist=$TMP/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::lists=$TMP/lists/"
    -o "Dir::Cache=$TMP/cache/"
    -o "Dir::Cache::pkgcache=$TMP/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$TMP/cache/srcpkgcache.bin"
    # bullseye's Release carries a Valid-Until that may be past; the
    # signature is still checked.
    -o "Acquire::Check-Valid-Until=false"
    -o "Acquire::AllowInsecureRepositories=false"
    -o "Acquire::Languages=none"
    -o "APT::Get::List-Cleanup=false"
    -q
)

apt-get "${APT_OPTS[@]}" update >&2
(cd "$TMP/download" && apt-get "${APT_OPTS[@]}" download consul >&2)

deb="$(ls "$TMP"/download/consul_*.deb)"
version="$(dpkg-deb -f "$deb" Version)"
case "$version" in
    "$CONSUL_VERSION"*) ;;
    *) log "expected consul $CONSUL_VERSION, $SUITE has $version"; exit 1 ;;
esac

mkdir -p "$CACHE_ROOT"
stage="$(mktemp -d "$CACHE_ROOT/.consul-$CONSUL_VERSION.XXXXXX")"
dpkg-deb -x "$deb" "$stage"
"$stage/usr/bin/consul" version >&2
# Atomic rename; if a concurrent run won the race, its copy is as good.
if ! mv -T "$stage" "$DEST" 2>/dev/null; then
    rm -rf "$stage"
fi
[[ -x "$CACHED_BIN" ]] || { log "unpacking failed: $CACHED_BIN missing"; exit 1; }
log "installed consul $version"
echo "$CACHED_BIN"
