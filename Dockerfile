# syntax=docker/dockerfile:1
# The sidecar image: a wheel built in one stage, only its virtualenv shipped in the next.
#   docker build -t sidecar .
#   docker volume create sidecar-data
#   docker run --stop-timeout 30 -v sidecar-data:/var/lib/sidecar -e SIDECAR_AUTH_TOKENS=... \
#     -p 127.0.0.1:8080:8080 -p 127.0.0.1:50051:50051 -p 127.0.0.1:9090:9090 sidecar
# (a volume, or the SQLite file dies with the container; a stop timeout longer than
# the 20-s drain; ports published on loopback unless other hosts must reach them)

# The Python minor release CI runs (3.11) on Debian 12, at its latest patch release
# (security fixes) when built. For byte-for-byte rebuilds pass a digest you checked:
# --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# PIP_CONSTRAINT, unlike -c, also binds the build backend pip installs to build the
# wheel (setuptools) up to pip 25.2; later pips read PIP_BUILD_CONSTRAINT for that.
# Every package is the version CI tested (constraints.txt), not whatever is newest.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/constraints.txt \
    PIP_BUILD_CONSTRAINT=/src/constraints.txt \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Every dependency ships binary wheels for amd64 and arm64, so no compiler is
# needed even here; on a platform without them, add build-essential to this
# stage only.
# The dependencies first, in a layer of their own: an edit of the sidecar's code
# rebuilds only the layers below, not grpcio and the rest.
COPY pyproject.toml constraints.txt ./
RUN python -m venv /opt/venv \
    && python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY sidecar ./sidecar
# pip and setuptools are removed afterwards: nothing installs at run time. The last
# step imports what `serve` runs (the generated protobuf code checks its protobuf
# version at import), so a missing or mismatched dependency fails the build, not
# the first start.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps "$(ls /wheels/sidecar-*.whl)" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -c "import sidecar.app, sidecar.store.redis, sidecar.bots.script, uvloop" \
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
