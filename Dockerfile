# The bot and its GPU worker on an NVIDIA host (driver + NVIDIA Container Toolkit on the host).
# A slim Python base, not nvidia/cuda: the torch wheel from PyPI brings its own CUDA and cuDNN
# (the nvidia-* wheels in requirements.lock) and loads only those, so a CUDA base image's copies
# would be gigabytes nothing uses. The host's driver must support the wheel's CUDA (README: "Docker").
# The tag names the Python release (the same Python in every build); Docker Hub rebuilds it with
# Debian's security fixes until the next release. A digest after it would freeze the rest too.
FROM python:3.12.16-slim-trixie

# The NVIDIA Container Toolkit mounts the driver only into containers that ask for it: the
# nvidia/cuda images set these two, a plain base must too. Without them `--runtime=nvidia` gives no
# GPU, and toolkits that default to `utility` mount nvidia-smi but not libcuda. `--gpus` and
# compose's device reservation still choose which GPUs.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data \
    HF_HOME=/hf-cache \
    HEARTBEAT_FILE=/tmp/bot-heartbeat

# gcc and libc6-dev (the Python headers come with this image): Triton builds its small kernel
# launchers with them when the worker compiles the model for generation and the training step
# (COMPILE_GENERATION, COMPILE_TRAINING). No libGL or GLib: OpenCV is the headless wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 avatar \
    && mkdir -p /app /data /hf-cache \
    && chown avatar:avatar /app /data /hf-cache

WORKDIR /app
USER 10001

# Exactly the versions and files in requirements.lock (`make lock` writes it from requirements.txt):
# every package pinned with its hashes, wheels only, so two builds install the same bytes. pip is
# the one this Python release bundles, not upgraded, for the same reason.
COPY --chown=avatar:avatar requirements.lock .
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock

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
