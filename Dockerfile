# syntax=docker/dockerfile:1
# The sidecar image: a wheel built in one stage, only its virtualenv shipped in the next.
#   docker build -t sidecar .
#   docker run -p 8080:8080 -p 50051:50051 -p 9090:9090 -e SIDECAR_AUTH_TOKENS=change-me sidecar

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The versions CI tested (constraints.txt), not whatever is newest at build time.
# Every dependency ships binary wheels for amd64 and arm64, so no compiler is
# needed even here; on a platform without them, add build-essential to this
# stage only.
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
# pip and setuptools are removed afterwards: nothing installs at run time.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt "$(ls /wheels/sidecar-*.whl)" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/sidecar --help > /dev/null

FROM ${PYTHON_IMAGE}
# One uid/gid the Kubernetes manifests can name (runAsUser: 10001).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sidecar --no-create-home \
       --shell /usr/sbin/nologin sidecar \
    && install --directory --owner=10001 --group=10001 --mode=0750 /var/lib/sidecar
# The same path as in the builder: the venv's scripts name /opt/venv/bin/python.
COPY --from=builder /opt/venv /opt/venv
# The listeners bind all interfaces so a published port or a pod neighbour can
# reach them. Bound like that, the sidecar REFUSES TO START without
# SIDECAR_AUTH_TOKENS (or SIDECAR_AUTH_TOKENS_FILE), unless
# SIDECAR_ALLOW_UNAUTHENTICATED=true says that open access is intended.
# Bytecode was compiled at install; writing more would fail on a read-only root.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_HTTP_ADDR=0.0.0.0:8080 \
    SIDECAR_GRPC_ADDR=0.0.0.0:50051 \
    SIDECAR_ADMIN_ADDR=0.0.0.0:9090 \
    SIDECAR_STORE=sqlite:////var/lib/sidecar/sidecar.db
# The data directory: mount a volume here, or the SQLite file dies with the container.
WORKDIR /var/lib/sidecar
USER 10001:10001
# 8080 HTTP ingress and bot callbacks, 50051 gRPC, 9090 /healthz /readyz /metrics.
EXPOSE 8080 50051 9090
# /healthz is liveness only (the process answers); /readyz also checks the store.
# Change the port here too if SIDECAR_ADMIN_ADDR is changed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
# SIGTERM drains: readiness fails, new work is refused, in-flight work finishes
# within SIDECAR_DRAIN_TIMEOUT (20 s by default), then the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["serve"]
