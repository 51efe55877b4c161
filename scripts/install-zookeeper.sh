#!/usr/bin/env bash
# Install ZooKeeper 3.8 (Debian's `zookeeper` package: jars and scripts, no
# daemon unit; the test fixtures start the JVM themselves), Apache Curator
# x-discovery (the Java probe of our registrations) with Curator's recipes (its
# ServiceCache needs them: the interop tests watch our entries through one) and
# an SLF4J binding so the server's logs are not silently off. Idempotent: quiet
# and fast when all is already there. Needs root (apt-get).
set -euo pipefail

need=()
[[ -f /usr/share/java/zookeeper.jar ]] || need+=(zookeeper)
[[ -f /usr/share/java/curator-x-discovery.jar ]] || need+=(libcurator-discovery-java)
[[ -f /usr/share/java/curator-recipes.jar ]] || need+=(libcurator-recipes-java)
# libslf4j-java ships slf4j-simple.jar (among other bindings).
[[ -f /usr/share/java/slf4j-simple.jar ]] || need+=(libslf4j-java)
# javac compiles the Curator probe; zookeeper alone pulls only a JRE.
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)

if ((${#need[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-zookeeper.sh: need root to install: ${need[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-zookeeper.sh: installing ${need[*]}" >&2
# Another install running at the same time holds dpkg's lock: wait for it.
apt-get update -qq -o DPkg::Lock::Timeout=300
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${need[@]}" >/dev/null

for f in /usr/share/java/zookeeper.jar /usr/share/java/curator-x-discovery.jar \
         /usr/share/java/curator-recipes.jar /usr/share/java/slf4j-simple.jar; do
    [[ -f $f ]] || { echo "install-zookeeper.sh: $f missing after install" >&2; exit 1; }
done
