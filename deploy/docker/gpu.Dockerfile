# syntax=docker/dockerfile:1
# xaid on NVIDIA GPUs. Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile -t xaid:gpu .
#   docker run --rm --gpus all -p 50051:50051 -p 9464:9464 xaid:gpu --require-gpu
#
# The base image must carry the CUDA and cuDNN major versions the onnxruntime-gpu wheel was built
# for: ONNXRUNTIME_VERSION below is built for CUDA 13 and cuDNN 9 (its metadata requires
# nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0). tests/deploy checks the pairing.
# The host needs an NVIDIA driver that supports CUDA 13 (R580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG ONNXRUNTIME_VERSION=1.31.1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/xaid
# The sources are mounted for the install only, so the image holds the installed package alone.
RUN --mount=type=bind,source=.,target=/src,rw \
    /opt/xaid/bin/pip install "/src[server]" "onnxruntime-gpu==${ONNXRUNTIME_VERSION}"

# Ubuntu 24.04 images ship a user with uid 1000; xaid gets its own.
RUN groupadd --system --gid 10001 xaid \
    && useradd --system --uid 10001 --gid xaid --home-dir /home/xaid --create-home xaid

ENV PATH=/opt/xaid/bin:$PATH \
    XAID_HOST=0.0.0.0 \
    XAID_PORT=50051 \
    XAID_METRICS_HOST=0.0.0.0 \
    XAID_METRICS_PORT=9464

USER 10001:10001
WORKDIR /home/xaid
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "xaid_server.healthcheck"]
ENTRYPOINT ["xaid", "serve"]
