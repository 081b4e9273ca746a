# The bot and its GPU worker on an NVIDIA host (driver + NVIDIA Container Toolkit on the host).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data \
    HF_HOME=/hf-cache \
    HEARTBEAT_FILE=/tmp/bot-heartbeat

# gcc and python3-dev: Triton builds its small kernel launchers with them when the worker compiles
# the model for generation and the training step (COMPILE_GENERATION, COMPILE_TRAINING). No libGL or
# GLib: OpenCV is the headless wheel, which links neither.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 avatar \
    && mkdir -p /app /data /hf-cache \
    && chown avatar:avatar /app /data /hf-cache

WORKDIR /app
USER 10001

COPY --chown=avatar:avatar requirements.txt .
RUN python3 -m venv /app/.venv \
    && /app/.venv/bin/pip install --upgrade pip \
    && /app/.venv/bin/pip install -r requirements.txt

COPY --chown=avatar:avatar bot ./bot
COPY --chown=avatar:avatar jobs ./jobs
COPY --chown=avatar:avatar trainer ./trainer
COPY --chown=avatar:avatar photos ./photos
COPY --chown=avatar:avatar storage ./storage
COPY --chown=avatar:avatar common ./common

VOLUME ["/data", "/hf-cache"]
# `docker stop` sends SIGTERM: the bot stops its workers at their next step (a training keeps its last
# checkpoint), tells the people waiting, logs "stopped" and exits 0. Run it with an init process
# (compose: `init: true`; `docker run --init`) so that signals and orphaned processes are handled.
STOPSIGNAL SIGTERM
# Unhealthy while the bot is not connected to Discord (a refused token, no network) or its event loop
# is stuck: the bot rewrites HEARTBEAT_FILE every 10 s while connected (bot/health.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["/app/.venv/bin/python", "-m", "bot.health"]
ENTRYPOINT ["/app/.venv/bin/python", "-m", "bot"]
