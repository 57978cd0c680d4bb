# quantrouter container images (docs/conventions.md §6).
#   docker build -t quantrouter:0.1.0 .                                  router only, in front of Ollama
#   docker build --target embedded -t quantrouter:0.1.0-embedded .       + llama.cpp and the gemma3:270m ladder
# The default target is the last stage, so a plain build never pulls in llama.cpp or a compiler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Same path in every stage: a venv's scripts carry absolute shebangs.
ARG VENV=/opt/venv

FROM ${PYTHON_IMAGE} AS builder
ARG VENV
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=${VENV}/bin:${PATH}
RUN python -m venv ${VENV}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY src ./src
# A regular (non-editable) install: hatch-protobuf generates quantrouter/v1/*_pb2*.py into the wheel.
RUN pip install --no-cache-dir "/src[gpu,k8s,gateway]"

# llama-cpp-python has no wheel for this platform and compiles from source.
FROM builder AS embedded-builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && rm -rf /var/lib/apt/lists/*
# Portable CPU code (not -march of the build host); ggml's own thread pool instead of OpenMP, so the
# runtime image needs no libgomp.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" \
    QUANTROUTER_CACHE_DIR=/opt/quantrouter/cache
RUN pip install --no-cache-dir "/src[gpu,embedded]" \
    && quantrouter embedded prepare

# What both images share: no compiler, numeric non-root user, nothing written outside /tmp.
FROM ${PYTHON_IMAGE} AS runtime-base
ARG VENV
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=${VENV}/bin:${PATH}
RUN groupadd --gid 10001 quantrouter \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin quantrouter
# gRPC, then Prometheus metrics (config.py DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT).
EXPOSE 50051 9464
ENTRYPOINT ["quantrouter"]
CMD ["serve"]

FROM runtime-base AS embedded
ARG VENV
ENV QUANTROUTER_CACHE_DIR=/opt/quantrouter/cache
COPY --from=embedded-builder ${VENV} ${VENV}
# Owned by the runtime user: the ladder cache takes a lock file beside the models.
COPY --from=embedded-builder --chown=10001:10001 /opt/quantrouter/cache /opt/quantrouter/cache
# Numeric, so the kubelet can check runAsNonRoot (docs/conventions.md §4).
USER 10001:10001
CMD ["serve", "--embedded"]

FROM runtime-base AS production
ARG VENV
COPY --from=builder ${VENV} ${VENV}
USER 10001:10001
