# syntax=docker/dockerfile:1
# One image for every RecMesh process. The default command runs the gateway;
# docker-compose.yml picks the process per service (`python -m services.feature`, ...).

# ---- builder: runtime dependencies in /opt/venv, the source tree in /app ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

WORKDIR /app
# Dependencies first, read from pyproject (no `train`/`dev` extras: serving needs no
# torch), so that source-only changes reuse this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY mesh/ mesh/
COPY core/ core/
COPY services/ services/
COPY gateway/ gateway/
COPY ops/ ops/
COPY training/ training/
COPY gen/ gen/
COPY config/ config/
COPY protos/ protos/
# `pip install .` adds the project itself (and the generated stubs under gen/); drop the
# build leftovers and precompile the tree, which is read-only for the runtime user.
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info gen/*.egg-info \
    && python -m compileall -q --invalidation-mode checked-hash mesh core services gateway ops training gen

# ---- runtime ----
FROM python:3.11-slim AS runtime

RUN groupadd --system --gid 10001 recmesh \
    && useradd --system --uid 10001 --gid recmesh --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin recmesh

# PYTHONPATH puts the copied tree ahead of the installed copy, so mesh.paths resolves
# PROJECT_ROOT to /app (config/ and the default artifacts/ live there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECMESH_HOST=0.0.0.0 \
    RECMESH_ARTIFACTS=/app/artifacts

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --from=builder /app /app
# The gateway's outbox and the mesh's certificates (the compose file's `certs` job writes
# them) live on volumes mounted here (docker-compose.yml); a named volume takes the owner
# of the image's directory, so the runtime user can write it.
RUN mkdir -p /data/outbox /data/tls && chown 10001:10001 /data/outbox /data/tls

USER 10001:10001
# gRPC: gateway 50050, services 50051-50056, projector 50057; HTTP API: 8080.
EXPOSE 8080 50050-50057
# No HEALTHCHECK here: the port differs per process, so compose sets
# `python -m ops.healthcheck <port>` on each service.
CMD ["python", "-m", "gateway"]
