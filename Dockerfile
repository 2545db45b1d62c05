# The sidecar image; the same image runs the example producer and consumer (it installs
# both distributions: the client from clients/python, then the sidecar with its tools). Build: docker build -t order-sidecar .

# Build stage: pip and the build backend stay here, only the virtualenv moves on.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY tools ./tools
COPY clients/python ./clients/python
RUN /opt/venv/bin/pip install ./clients/python .

FROM python:3.11-slim
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sidecar sidecar
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /app/healthcheck.py
COPY examples /app/examples
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
# gRPC (127.0.0.1 by default: callers share the network namespace) and /metrics.
EXPOSE 50051 9464
# Readiness-style: healthy while the sidecar answers SERVING on its own listen address
# (ORDER_SIDECAR_LISTEN). Containers of this image that run no sidecar turn it off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "--timeout", "3"]
CMD ["order-sidecar", "serve"]
