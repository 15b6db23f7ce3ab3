# The targets here are exactly what CI runs. `make demo` and `make test` work from a fresh
# clone with only Python >= 3.11, make and the package registries.

SHELL := /bin/bash
ifndef PYTHON
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11; do \
	if $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then echo $$p; break; fi; done)
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODELS_STAMP := models/build/.built-stamp

.PHONY: install demo test lint proto proto-check models bench clean

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: Python >= 3.11 is required" >&2; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,models]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) $(MODELS_STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP) $(MODELS_STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check cabincrew/cli cabincrew/runtime
	$(BIN)/mypy cabincrew audit_svc preflight_svc approval_svc orchestrator_svc mcp_gateway llm_gateway
	npx --yes @bufbuild/buf lint proto

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

$(MODELS_STAMP): $(STAMP) $(wildcard models/*.py)
	$(BIN)/python -m models.build --out models/build
	@touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .cabincrew build *.egg-info
