# The registrar image: the core and every backend. Build from the repository root:
#   docker build -t registrar:0.1.0 .
FROM python:3.11-slim-bookworm

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY registrar/ registrar/
COPY backends/ backends/
# One layer: install with the pinned versions, then drop the sources.
RUN pip install --no-cache-dir -c constraints.txt . ./backends/* \
    && rm -rf /src \
    && useradd --system --uid 10001 registrar

WORKDIR /
USER 10001
# As PID 1 (`registrar run -- app`) registrar reaps zombies and forwards signals itself.
ENTRYPOINT ["registrar"]
CMD ["--help"]
