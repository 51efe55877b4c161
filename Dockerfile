# The registrar image: the core (with the webhook extra) and every backend in a virtual environment at
# /opt/registrar, run as uid 10001. Build from the repository root:
#   docker build -t registrar:0.1.0 .          (or: ./dev image, podman on this machine)
# BASE is any glibc image with Python >= 3.11 and either `python3 -m venv` with ensurepip
# or pip (python:3.11-slim-bookworm, or Debian with python3-venv); both stages use it, so
# the venv's interpreter link (bin/python -> the base's python3) holds in the final image.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY registrar/ registrar/
COPY backends/ backends/
# pyproject.toml names README.md as the long description: an empty one keeps an edit of the
# README from invalidating the install layer below (nothing in the image reads it).
RUN touch README.md
# Install with the pinned versions into a venv, then take pip and setuptools out of it: the
# final stage gets only this directory. setuptools (9 MB) is there only because pbr, which
# etcd3gw uses for its version string, declares it; nothing imports it at run time (the
# import check below runs without it). A base whose python3 has no ensurepip (Debian
# without python3-venv) installs into a pip-less venv with its own pip instead.
RUN set -eu; \
    if python3 -m venv /opt/registrar 2>/dev/null; then \
        pip="/opt/registrar/bin/python -m pip"; \
    else \
        rm -rf /opt/registrar; python3 -m venv --without-pip /opt/registrar; \
        pip="python3 -m pip --python /opt/registrar/bin/python"; \
    fi; \
    $pip install --no-cache-dir --disable-pip-version-check -c constraints.txt \
        ".[webhook]" ./backends/*; \
    $pip uninstall --yes --quiet setuptools pip 2>/dev/null || true; \
    /opt/registrar/bin/python -c 'import etcd3gw, consul, kazoo.client, jsonpatch, cryptography.x509, registrar.cli'; \
    /opt/registrar/bin/registrar --version

FROM ${BASE}
ARG VERSION=0.1.0
# Filled by scripts/image.sh from git; SOURCE is the repository's public URL once it has one.
ARG REVISION=unknown
ARG SOURCE=
ARG DESCRIPTION="Registers a pod in etcd, ZooKeeper or Consul and removes it before the app stops"
LABEL org.opencontainers.image.title="registrar" \
      org.opencontainers.image.description="${DESCRIPTION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# A regular (non-system) user: a uid in useradd's UID_MIN..UID_MAX range, no home, no shell.
# Numeric in USER so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin registrar
COPY --from=builder /opt/registrar /opt/registrar
ENV PATH=/opt/registrar/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /
# As PID 1 (`registrar run -- app`) registrar reaps zombies and forwards signals itself:
# no init (tini) is needed.
ENTRYPOINT ["registrar"]
CMD ["--help"]
