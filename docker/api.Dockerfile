# syntax=docker/dockerfile:1
# Service image: CPU only, slim, non-root. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t remi-api .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU wheel of torch: PyPI's default Linux wheel brings gigabytes of CUDA libraries that a
# CPU service never loads.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
COPY remi_core ./remi_core
COPY training ./training
COPY service ./service
ARG FAISS_VERSION=1.15.1
RUN pip install ".[serve,cpu]" "faiss-cpu==${FAISS_VERSION}"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REMI_BUNDLE_ROOT=/bundles
# Fixed uid/gid shared with the trainer image, so both can use the same bundle volume. /bundles
# is created here owned by that user: Docker copies it into a fresh named volume.
RUN groupadd --system --gid 10001 remi \
    && useradd --system --uid 10001 --gid remi --home-dir /app --shell /usr/sbin/nologin remi \
    && mkdir -p /app /bundles \
    && chown remi:remi /app /bundles
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER remi
EXPOSE 8000
# Slim images have no curl: ask the liveness endpoint with the Python that is there anyway.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["remi-serve", "--host", "0.0.0.0", "--port", "8000"]
