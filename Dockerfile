# syntax=docker/dockerfile:1
# aleno-bridge container image.
#   docker build -t aleno-bridge:0.1.0 .
#   docker run --rm -v $PWD/config.yaml:/etc/aleno-bridge/config.yaml:ro \
#     -e ALENO_API_KEY -p 9464:9464 aleno-bridge:0.1.0
# (set `http: {host: 0.0.0.0}` in the config to reach /metrics from outside the container;
# the Helm chart does that for you.)

ARG PYTHON_IMAGE=python:3.12-slim

# --- builder: a self-contained virtualenv with the bridge and every bus driver ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
# A wheel first (no editable install, no source tree at run time), then the wheel with
# the `all` extra: aiokafka, nats-py, paho-mqtt.
RUN pip install --upgrade pip setuptools wheel \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && pip install "$(ls /wheels/aleno_bridge-*.whl)[all]" \
 && aleno-bridge --help >/dev/null

# --- runtime: the venv only; no compiler, no pip cache, no source -----------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="aleno-bridge" \
      org.opencontainers.image.description="Aleno real-time prices as CloudEvents on Kafka, NATS, MQTT" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin bridge \
 && mkdir -p /etc/aleno-bridge
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
# 9464: probes and metrics (http); 9465: the control API (control.http, tokens required off loopback)
EXPOSE 9464 9465
ENTRYPOINT ["aleno-bridge"]
CMD ["run", "-c", "/etc/aleno-bridge/config.yaml"]
