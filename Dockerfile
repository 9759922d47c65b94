# paramsel in containers: two images from this file (README.md's Docker section; docker-compose.yml runs both).
#
#   docker build --target server -t paramsel:0.1.0 .        paramsel serve, and nothing else (the default target)
#   docker build --target demo -t paramsel-demo:0.1.0 .     the same plus the demo's Flower App (paramsel-demo)
#   docker run -p 50051:50051 paramsel:0.1.0                serve; `docker run paramsel:0.1.0 --help` and
#                                                           `docker run paramsel:0.1.0 paramsel --help` both work
#
# The server image has CPU-only torch and no demo packages (scikit-learn, scipy, matplotlib); nor sympy,
# mpmath and networkx, which torch only needs for torch.compile and export, never called by the server.
#
# Where the Python packages come from: the build context's wheelhouse/ decides.
#   - With wheels in it (scripts/fill_wheelhouse.sh downloads on the host every wheel both images need,
#     CPU torch included, at requirements/dev.lock's versions), pip installs with --no-index --find-links
#     /wheelhouse: the build needs no network at all, and CI builds with --network none.
#   - Empty (as committed: only its README), torch comes from PyTorch's CPU index and the rest from PyPI,
#     held to requirements/dev.lock.
#   Never a mix: a wheelhouse with any wheel in it must hold all of them. One `docker build .` works on a
#   machine with network and on one without (given the wheelhouse), with no build argument to remember,
#   and what a build installed can be read from its context.
#
# Stages: builder (a venv with paramsel serve's packages), demo-builder (that venv plus the demo extra),
# runtime (the non-root user, the health check and the entrypoint, on the same slim base), then demo and
# server: runtime plus one venv (and, for demo, the Flower App's folder). Only those reach an image.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src

# torch's wheel comes first and alone, so that a change to the other wheels (or to the lock) does not
# install torch again; the README is always there, so this COPY has a source when the wheelhouse is
# empty. Then the rule above, written once as pip's configuration, in this stage only (no image gets
# /etc/pip.conf): a wheelhouse holding wheels (torch's among them) is pip's only source.
COPY wheelhouse/README.md wheelhouse/torch-* /wheelhouse/
RUN if [ -n "$(find /wheelhouse -name '*.whl' -print -quit)" ]; then \
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > /etc/pip.conf; \
    fi \
    && python -m venv /opt/venv

# torch alone (its dependencies come with paramsel's below), from PyTorch's CPU index: the PyPI wheel
# would pull in ~3 GB of CUDA libraries. (With a filled wheelhouse, --no-index leaves the URL unused.)
# Then out go the wheel's C++ headers and C++ test programs (torch/include, torch/test, torch/bin but
# its torch_shm_manager): only building extensions and testing torch itself use them. ~190 MB.
RUN pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && torch=/opt/venv/lib/python3.11/site-packages/torch \
    && rm -rf "${torch}/include" "${torch}/test" \
    && find "${torch}/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +

# Then paramsel's two distributions as wheels, each built from its folder: paramsel-client (client_sdk/,
# the SDK, the wire codec and the bindings) and paramsel (server/, the server and the engine, which
# requires paramsel-client at its own version: the wheel beside it, named here, is that one). Their
# dependencies at the versions of requirements/dev.lock, the lock CI tests with (its torch==2.13.0+cpu
# is the one installed above, so pip keeps it). The folders' README.md and LICENSE are links to the
# root's, copied beside them.
COPY wheelhouse/ /wheelhouse/
COPY requirements/dev.lock requirements/dev.lock
COPY README.md LICENSE ./
COPY client_sdk/ client_sdk/
COPY server/ server/
RUN pip wheel --no-deps --wheel-dir /wheels ./client_sdk ./server \
    && pip install --constraint requirements/dev.lock /wheels/paramsel_client-*.whl /wheels/paramsel-*.whl \
    && pip uninstall --yes sympy mpmath networkx \
    && paramsel --help >/dev/null \
    && python -c "import paramsel.engine, paramsel.server.app, torch; assert torch.version.cuda is None"


# The demo's venv: the same plus the server's demo extra (its dependencies: flwr[simulation],
# scikit-learn, matplotlib, ...) and what the uninstall above left out, so that `pip check` passes
# here. Then the demo's Flower App (demo/) in /opt/paramsel-demo, installed editable with no
# dependencies (they are the extra's): `paramsel-demo` finds the app's folder (its pyproject.toml, which
# `flwr run` packages) beside its package, as in a checkout. The demo image copies the venv and that
# folder, nothing else.
FROM builder AS demo-builder

COPY demo/ /opt/paramsel-demo/
RUN for wheel in /wheels/paramsel-*.whl; do pip install --constraint requirements/dev.lock "${wheel}[demo]"; done \
    && pip install --no-deps --editable /opt/paramsel-demo \
    && pip check \
    && paramsel-demo --help >/dev/null \
    && python -c "import flwr, paramsel_demo.server_app, paramsel_demo.client_app"


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="paramsel" \
      org.opencontainers.image.description="Parameter selection as a service for federated learning (gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 paramsel \
    && useradd --system --uid 10001 --gid paramsel --create-home --home-dir /home/paramsel \
       --shell /usr/sbin/nologin paramsel

# GLIBC_TUNABLES: glibc's malloc keeps freed memory for the next call (the server gives it back once
# idle), in one heap for every thread, and faults it in as huge pages (server/paramsel/server/memory.py
# says why; `paramsel serve` otherwise restarts itself with them).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1

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

# The arguments are paramsel's: `docker run IMAGE --help`, `docker run IMAGE serve --port 6000`. A
# leading `paramsel` is dropped, so `docker run IMAGE paramsel --help` works too. exec: paramsel is
# PID 1 and gets the SIGTERM. (A shell: docker run --entrypoint sh.)
ENTRYPOINT ["/bin/sh", "-c", "if [ \"${1-}\" = paramsel ]; then shift; fi; exec paramsel \"$@\"", "paramsel"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]


FROM runtime AS demo

LABEL org.opencontainers.image.title="paramsel-demo" \
      org.opencontainers.image.description="paramsel and its demo's Flower App (paramsel-demo: flwr, scikit-learn, matplotlib)"

# matplotlib's cache, writable whatever user the demo runs as (docker-compose.yml: PARAMSEL_DEMO_USER).
ENV MPLCONFIGDIR=/tmp/matplotlib

COPY --from=demo-builder /opt/venv /opt/venv
COPY --from=demo-builder /opt/paramsel-demo /opt/paramsel-demo


# The default target, last: `docker build .` gives the server image.
FROM runtime AS server

COPY --from=builder /opt/venv /opt/venv
