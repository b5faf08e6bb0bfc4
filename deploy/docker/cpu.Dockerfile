# syntax=docker/dockerfile:1
# xaid on the CPU. Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t xaid:cpu .
#   docker run --rm -p 50051:50051 -p 9464:9464 xaid:cpu
# The onnxruntime-gpu wheel of the server extra runs on the CPU too; the start-up probe logs
# that CUDA is not usable and every model reports CPUExecutionProvider.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/xaid
# The sources are mounted for the install only, so the image holds the installed package alone.
RUN --mount=type=bind,source=.,target=/src,rw \
    /opt/xaid/bin/pip install "/src[server]"

RUN groupadd --system --gid 10001 xaid \
    && useradd --system --uid 10001 --gid xaid --home-dir /home/xaid --create-home xaid

# The container listens on every interface; the defaults of a bare `xaid serve` stay on loopback.
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
