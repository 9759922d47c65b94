# One entry point for every task. Each target sets up what it needs first (the .venv stamp).
PY := .venv/bin/python
STAMP := .venv/.installed
SOURCES := server client_sdk tests examples benchmarks scripts

.PHONY: setup proto check-proto check-container lint format test demo example bench serve ci clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet -c requirements/constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

proto: setup  ## regenerate gen/python from proto/
	PYTHON=$(PY) scripts/gen_proto.sh

check-proto: setup  ## fail when gen/python is stale
	PYTHON=$(PY) scripts/check_stubs.sh

check-container: setup  ## hadolint the Dockerfile, validate docker-compose.yml (no Docker engine needed)
	scripts/check_container.sh

lint: setup  ## buf lint and buf breaking (against the last release's image), ruff, mypy
	.venv/bin/buf lint
	.venv/bin/buf breaking --against proto/releases/paramsel-v1-0.1.0.binpb
	.venv/bin/ruff check $(SOURCES)
	.venv/bin/ruff format --check $(SOURCES)
	.venv/bin/mypy

format: setup
	.venv/bin/ruff check --fix $(SOURCES)
	.venv/bin/ruff format $(SOURCES)

test: setup  ## the whole test suite
	$(PY) -m pytest

demo: setup  ## the main job: a real federated run (service, coordinator, 3 clients) over loopback gRPC
	.venv/bin/paramsel demo

example: setup  ## the FL4Health-style example client against a separately started paramsel serve
	scripts/example.sh

bench: setup  ## every issue-3 target side by side; writes benchmarks/results/latest.json
	$(PY) -m benchmarks.run

serve: setup
	.venv/bin/paramsel serve

ci: check-proto lint test

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
