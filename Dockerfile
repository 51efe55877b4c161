# The registrar image: the core (with the webhook extra) and every backend in a virtual environment at
# /opt/registrar, run as uid 10001; beside it, /opt/registrar-wheels holds the wheels of
# registrar[all] and its dependencies, the compiled ones for CPython 3.11 to 3.14 (PYTHONS), from
# which an app image on another base installs registrar offline (docs/install.md). Build from the
# repository root:
#   docker build -t registrar:0.1.0 .          (or: ./dev image, podman on this machine)
# BASE is any glibc image with Python >= 3.11 and either `python3 -m venv` with ensurepip
# or pip (python:3.11-slim-bookworm, or Debian with python3-venv); both stages use it, so
# the venv's interpreter link (bin/python -> the base's python3) holds in the final image.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
# The CPython versions /opt/registrar-wheels serves (the base's own among them).
ARG PYTHONS="3.11 3.12 3.13 3.14"
WORKDIR /src
COPY pyproject.toml constraints.txt MANIFEST.in ./
COPY registrar/ registrar/
COPY backends/ backends/
COPY scripts/image-wheels.py scripts/
# pyproject.toml names README.md as the long description, MANIFEST.in CHANGELOG.md: empty ones keep
# an edit of either from invalidating the install layer below (nothing in the image reads them).
RUN touch README.md CHANGELOG.md
# Build the wheels of registrar[all] and its dependencies with the pinned versions, add the
# compiled ones for the other PYTHONS (checking that each installs from them alone), install
# registrar[all] from them into a venv, then the webhook extra (not among the wheels: app
# images do not run the webhook). Then take pip and setuptools out of the venv: the final
# stage gets only the venv and the wheels. setuptools (9 MB) is there only because pbr, which
# etcd3gw uses for its version string, declares it; nothing imports it at run time (the
# import check below runs without it). A base whose python3 has no ensurepip (Debian
# without python3-venv) installs into a pip-less venv with its own pip instead.
RUN set -eu; \
    if python3 -m venv /opt/registrar 2>/dev/null; then \
        py=/opt/registrar/bin/python; pip="$py -m pip"; \
    else \
        rm -rf /opt/registrar; python3 -m venv --without-pip /opt/registrar; \
        py=python3; pip="python3 -m pip --python /opt/registrar/bin/python"; \
    fi; \
    $py -m pip wheel --no-cache-dir --disable-pip-version-check --quiet -c constraints.txt \
        --wheel-dir /opt/registrar-wheels ".[all]" ./backends/*; \
    $py scripts/image-wheels.py /opt/registrar-wheels $PYTHONS; \
    $pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /opt/registrar-wheels "registrar[all]"; \
    $pip install --no-cache-dir --disable-pip-version-check -c constraints.txt \
        --find-links /opt/registrar-wheels "registrar[webhook]"; \
    $pip uninstall --yes --quiet setuptools pip 2>/dev/null || true; \
    /opt/registrar/bin/python -c 'import etcd3gw, consul, kazoo.client, jsonpatch, cryptography.x509, registrar.cli'; \
    /opt/registrar/bin/registrar --version

FROM ${BASE}
ARG BASE
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
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE}"
# A regular (non-system) user: a uid in useradd's UID_MIN..UID_MAX range, no home, no shell.
# Numeric in USER so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin registrar
COPY --from=builder /opt/registrar /opt/registrar
# Not inside the venv, so that copying /opt/registrar into an app image does not carry them.
COPY --from=builder /opt/registrar-wheels /opt/registrar-wheels
ENV PATH=/opt/registrar/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /
# As PID 1 (`registrar run -- app`) registrar reaps zombies and forwards signals itself:
# no init (tini) is needed.
ENTRYPOINT ["registrar"]
CMD ["--help"]
