# paramsel serve in a container: docker build -t paramsel:0.1.0 . && docker run -p 50051:50051 paramsel:0.1.0
# Two stages: the builder makes a wheel of paramsel and installs it, with the CPU build of torch, into the
# venv /opt/venv; the final stage is the same slim base with only that venv, run by a non-root user.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# torch first, from PyTorch's CPU index: the PyPI wheel would pull in ~3 GB of CUDA libraries. Its own
# layer, so that changing paramsel's source does not download torch again.
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Then paramsel as a wheel, and its other dependencies at the versions CI tests (torch==2.13.0 in the
# constraints is met by the 2.13.0+cpu already installed, so pip keeps it).
COPY pyproject.toml README.md ./
COPY server/ server/
COPY client_sdk/ client_sdk/
# The demo extra too: the compose file runs the demo's coordinator and clients from this image.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && for wheel in /wheels/paramsel-*.whl; do pip install --constraint requirements/constraints.txt "${wheel}[demo]"; done \
    && paramsel --help >/dev/null


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="paramsel" \
      org.opencontainers.image.description="Parameter selection as a service for federated learning (gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 paramsel \
    && useradd --system --uid 10001 --gid paramsel --create-home --home-dir /home/paramsel \
       --shell /usr/sbin/nologin paramsel

COPY --from=builder /opt/venv /opt/venv

# MALLOC_MMAP_THRESHOLD_: glibc returns large freed blocks at once (server/paramsel/server/memory.py
# says why; `paramsel serve` sets the same itself).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=131072

USER 10001:10001
WORKDIR /home/paramsel

EXPOSE 50051

# paramsel serve drains on SIGTERM: health turns NOT_SERVING, new calls are refused, and in-flight calls
# get --grace-seconds (default 10) to finish. Give the container a longer stop timeout than that
# (docker stop -t / compose stop_grace_period).
STOPSIGNAL SIGTERM

# grpc.health.v1 Check through paramsel itself; no separately downloaded probe binary. For a TLS server
# give the container PARAMSEL_CA_FILE (and PARAMSEL_CERT_FILE / PARAMSEL_KEY_FILE for mutual TLS) and,
# since the probe dials 127.0.0.1, PARAMSEL_TLS_SERVER_NAME: the host the server certificate names.
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
    CMD ["paramsel", "health", "--target", "127.0.0.1:50051", "--timeout", "5"]

ENTRYPOINT ["paramsel"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]
