# MACE-Field Serve container image.  Two targets:
#
#   runtime (the default, last stage): the server on e3nn (CPU, or CUDA through torch)
#   gpu     (--target gpu): the same plus NVIDIA cuEquivariance (server[cueq]) and its CUDA kernels for
#           torch's CUDA major version: backend auto serves every model on CUDA with cuEquivariance
#
#   docker build -t macefield-serve .                                   # torch from PyPI (CUDA build), e3nn
#   docker build -t macefield-serve:gpu --target gpu .                  # GPU hosts: + cuEquivariance kernels
#   docker build -t macefield-serve --build-arg TORCH_WHEEL_DIR=docker/wheels .
#                       # torch from wheel files in that build-context directory (e.g. a CPU wheel: no GPU, no large download)
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9100:9100 macefield-serve
#
# Serves the embedded default model on 0.0.0.0:50051 (gRPC) and :9100 (/metrics), plaintext: the CMD
# passes --insecure (a config file binding 0.0.0.0 needs `security: {insecure: true}` or TLS; docs/serving.md "Security").
# Own models: mount them and a config file naming them, e.g.
#   docker run -v macefield-models:/models:ro -v $PWD/docker/serve.models.yaml:/etc/macefield/serve.yaml:ro \
#       macefield-serve --config /etc/macefield/serve.yaml
# Stop: SIGTERM -> health NOT_SERVING, new calls refused, in-flight work finished within
# the server's grace_s (30 s unless the config says otherwise), exit 0.  Give the engine
# longer than that before it kills: `docker stop -t 40`, compose `stop_grace_period: 40s`.

ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------- builder: a venv in /opt/venv
FROM debian:bookworm-slim AS builder
ARG TORCH_VERSION
# directory in the build context holding a torch wheel; empty: torch from PyPI
ARG TORCH_WHEEL_DIR=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# torch first (the largest layer; cached across source changes)
COPY ${TORCH_WHEEL_DIR:-docker/wheels}/ /tmp/torch-wheels/
RUN if [ -n "$TORCH_WHEEL_DIR" ]; then \
        wheel=$(ls /tmp/torch-wheels/torch-${TORCH_VERSION}[-+]*.whl | head -n 1) \
        && [ -n "$wheel" ] && pip install --no-deps "$wheel"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi \
 && rm -rf /tmp/torch-wheels

# every other dependency at the exact version the test suite passed with
COPY docker/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

COPY client /src/client
COPY server /src/server
RUN pip install --no-deps /src/client /src/server \
 && pip check \
 && python -c "import macefield_server.weights as w; print('embedded default checkpoint:', w.DEFAULT_MODEL.exists())" \
 && ln -s "$(python -c 'import macefield_server, os; print(os.path.dirname(macefield_server.__file__))')/weights" \
        /opt/venv/embedded-models

# ---------------------------------------------------------------- builder-gpu: + cuEquivariance and its kernels
FROM builder AS builder-gpu
# the kernel package; empty (default): cuequivariance-ops-torch-cu<torch's CUDA major> at cuequivariance-torch's
# version (the server[cueq] extra pins cuEquivariance's minor version; docker/requirements.txt pins the rest)
ARG CUEQ_OPS=
# A builder without BuildKit (docker.io 20.10, docker-compose 1.x) runs this stage for the default target
# too, so a CPU torch skips it with a notice instead of failing the CPU image; an image built that way
# for --target gpu has no cuEquivariance, and docker/serve.gpu.yaml (backend: cueq) refuses to start on it.
RUN cuda="$(python -c 'import torch; print((torch.version.cuda or "").split(".")[0])')" \
 && if [ -z "$cuda" ]; then \
        echo "NOTICE: torch is a CPU build: cuEquivariance not installed (only --target gpu needs it, and it" \
             "needs a CUDA build of torch: leave TORCH_WHEEL_DIR empty, or give it a CUDA wheel)" >&2; \
        exit 0; \
    fi \
 && pip install -c /tmp/requirements.txt "/src/server[cueq]" \
 && version="$(python -c 'import importlib.metadata as m; print(m.version("cuequivariance-torch"))')" \
 && ops="${CUEQ_OPS:-cuequivariance-ops-torch-cu${cuda}==${version}}" \
 && echo "cuEquivariance kernels: $ops" \
 && pip install -c /tmp/requirements.txt "$ops" \
 && pip check \
 && python -c "from macefield_server.engine.cueq import cueq_import_error as e; assert e() is None, e(); print('cuEquivariance: ok')"

# ---------------------------------------------------------------- runtime-base: everything but the venv
FROM debian:bookworm-slim AS runtime-base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 macefield \
 && useradd --system --uid 10001 --gid macefield --home-dir /home/macefield --create-home --shell /usr/sbin/nologin macefield \
 && mkdir -p /models /etc/macefield /opt/macefield \
 && chown macefield:macefield /models \
 && ln -s /opt/venv/embedded-models /opt/macefield/embedded-models
# (a stable path to the embedded models, docker/serve.gpu.yaml names default.pt there; /opt/venv comes next)

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MACEFIELD_HEALTH_ADDRESS=127.0.0.1:50051

USER macefield
WORKDIR /home/macefield
VOLUME ["/models"]
EXPOSE 50051 9100

# NOT_SERVING (exit 1) until the models are loaded and warm, and again while draining
HEALTHCHECK --interval=10s --timeout=10s --start-period=180s --retries=3 \
    CMD macefield-health --timeout 5 || exit 1

STOPSIGNAL SIGTERM
ENTRYPOINT ["macefield-serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100", "--grace", "30", "--insecure"]

LABEL org.opencontainers.image.title="MACE-Field Serve" \
      org.opencontainers.image.description="gRPC server for field-aware MACE interatomic potentials" \
      org.macefield.grace-seconds="30" \
      org.macefield.stop-timeout-seconds="40"

# ---------------------------------------------------------------- gpu: docker build --target gpu
FROM runtime-base AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv

# ---------------------------------------------------------------- runtime: the default image
FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
