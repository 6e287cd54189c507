# syntax=docker/dockerfile:1
# Trainer image: CUDA base, CUDA torch and faiss-gpu, non-root. It runs the one-shot bootstrap
# and, with cron, the nightly job. It also runs on hosts without a GPU (torch falls back to the
# CPU); the GPU is only used when the container is given one (docker-compose.gpu.yml).
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t remi-trainer .
# For a host where CUDA wheels do not exist (e.g. arm64), build a CPU variant of the same image:
#   --build-arg BASE_IMAGE=ubuntu:24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#   --build-arg FAISS_PACKAGE=faiss-cpu==1.15.1
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian/Ubuntu `cron` for the scheduler. pam_loginuid cannot work in a container (no audit
# login uid to set), and as `required` it makes cron refuse to start every job: make it optional.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv cron ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && sed -i 's/^session\s\+required\s\+pam_loginuid\.so/session optional pam_loginuid.so/' \
        /etc/pam.d/cron

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch wheels bundle their CUDA runtime; the host only needs the NVIDIA driver.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
ARG FAISS_PACKAGE=faiss-gpu-cu12==1.14.1.post1
COPY pyproject.toml /src/
COPY remi_core /src/remi_core
COPY training /src/training
COPY service /src/service
RUN pip install "${FAISS_PACKAGE}" "/src[train]" && rm -rf /src

# Fixed uid/gid shared with the api image (same bundle volume). The volume mount points are
# created owned by it, so fresh named volumes are writable by the jobs.
RUN groupadd --system --gid 10001 remi \
    && useradd --system --uid 10001 --gid remi --home-dir /app --shell /usr/sbin/nologin remi \
    && mkdir -p /app /bundles /state \
    && chown remi:remi /app /bundles /state
WORKDIR /app
COPY configs ./configs
COPY docker/crontab docker/scheduler-entrypoint.sh ./docker/
RUN chmod 0755 docker/scheduler-entrypoint.sh
ENV REMI_BUNDLE_ROOT=/bundles REMI_STATE_DIR=/state
USER remi
HEALTHCHECK --interval=60s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import training.nightly"]
CMD ["remi-train", "--help"]
