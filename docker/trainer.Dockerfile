# Trainer image: CPU by default, non-root. It runs the one-shot bootstrap and, with cron, the
# nightly job. Same Python (3.11, same base image) and same pinned packages as the API image.
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t remi-trainer .
# GPU training is opt-in (docker-compose.gpu.yml passes these build args and adds the GPU):
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#   --build-arg FAISS_PACKAGE=faiss-gpu-cu12==1.14.1.post1
# CUDA torch wheels bring their CUDA runtime (from PyPI's nvidia-* packages, which the
# constraints do not pin); the host needs only the NVIDIA driver and Container Toolkit.
# Reproducible: base image by full version tag (digest: scripts/pin-images.sh), Python packages
# by docker/constraints.txt (scripts/lock.sh).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY docker/constraints.txt /tmp/constraints.txt
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install -c /tmp/constraints.txt --no-deps --index-url "${TORCH_INDEX_URL}" torch
ARG FAISS_PACKAGE=faiss-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY remi_core ./remi_core
COPY training ./training
COPY service ./service
# PIP_CONSTRAINT pins the build backend too: pip's isolated build environment ignores -c and
# would take the newest setuptools.
RUN PIP_CONSTRAINT=/tmp/constraints.txt pip install -c /tmp/constraints.txt "${FAISS_PACKAGE}" ".[train]"

FROM ${PYTHON_IMAGE}
# No OMP_WAIT_POLICY here: remi-train keeps OpenMP's spinning wait (fast on idle cores) and
# resizes its pool to the CPUs other processes leave free, starting from the container's CPU
# quota (remi_core/threads.py); REMI_THREADS fixes the count.
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian's `cron` for the scheduler. pam_loginuid cannot work in a container (no audit login uid
# to set), and as `required` it makes cron refuse to start every job: make it optional.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cron \
    && rm -rf /var/lib/apt/lists/* \
    && sed -i 's/^session\s\+required\s\+pam_loginuid\.so/session optional pam_loginuid.so/' \
        /etc/pam.d/cron
COPY --from=build /opt/venv /opt/venv

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
# Cheap: checks that the package is installed without importing it (importing torch every
# minute cost seconds of CPU and hundreds of MB). The scheduler overrides it with cron's PID.
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import importlib.metadata as m; m.distribution('remi-retrieval')"]
CMD ["remi-train", "--help"]
