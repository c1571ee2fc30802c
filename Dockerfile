# aleno-bridge container image. Build it with `make image` (tags aleno-bridge:<version>,
# sets the OCI labels, prints size and build time); by hand:
#   docker build -t aleno-bridge:0.1.0 --build-arg VERSION=0.1.0 .
#   docker run --rm --read-only -v $PWD/config.yaml:/etc/aleno-bridge/config.yaml:ro \
#     -e ALENO_API_KEY -p 9464:9464 aleno-bridge:0.1.0
# (set `http: {host: 0.0.0.0}` in the config to reach /metrics from outside the container;
# the Helm chart does that for you.) docs/image.md has the details and the offline path.

# Any image with python3 and its venv module: the official slim image, or the one
# `make base-image` builds from Debian packages (aleno-bridge-base:<python version>).
# Both stages use it: the venv built in the first one runs on the same interpreter.
ARG PYTHON_IMAGE=docker.io/library/python:3.12-slim

# --- builder: the wheel, then a venv with the bridge and every bus driver ------------------
FROM ${PYTHON_IMAGE} AS builder
# an index mirror for networks without PyPI; set only for this stage, never in the image
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# pip lives in a throwaway venv (a Debian python3 has none outside venvs); the runtime venv
# is made without pip and filled from outside, so it holds the bridge and its dependencies only
RUN python -m venv /opt/build \
 && python -m venv --without-pip /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY plugins/aleno_bridge_plugins ./plugins/aleno_bridge_plugins
# `all`: aiokafka, nats-py, paho-mqtt. pip compiles every module, so a read-only root
# filesystem costs no start-up time. The optional secret `pip_cert` is a CA bundle for pip
# (a TLS-inspecting proxy's CA; `make image` passes the host's PIP_CERT); it is mounted
# for this step only and is in no layer.
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install "$(ls /wheels/aleno_bridge-*.whl)[all]" \
 && /opt/venv/bin/aleno-bridge plugins >/dev/null

# --- runtime: the venv only; no compiler, no pip, no cache, no source tree ---------------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="aleno-bridge" \
      org.opencontainers.image.description="Aleno real-time prices as CloudEvents on Kafka, NATS, MQTT" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 bridge \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
      --home-dir /nonexistent --shell /usr/sbin/nologin bridge \
 && mkdir -p /etc/aleno-bridge
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# the bridge writes only to paths its config names (a jsonl sink's file...): with a read-only
# root filesystem, mount a volume or a tmpfs there
WORKDIR /tmp
# 9464: probes and metrics (http); 9465: the control API (control.http, tokens required off loopback)
EXPOSE 9464 9465
# the bridge is PID 1: on SIGTERM it drains every sink (up to shutdown_timeout_s) and exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["aleno-bridge"]
CMD ["run", "-c", "/etc/aleno-bridge/config.yaml"]
