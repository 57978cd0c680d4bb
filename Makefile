# quantrouter: `make run` serves on the embedded backend (no GPU, no Ollama); `make test` passes the tests.
# Every target installs what it needs from nothing: a virtualenv in .venv and, for the tests, promtool.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run demo test lint typecheck bench prepare tools clean

install: $(STAMP)

$(STAMP): pyproject.toml protos/quantrouter/v1/*.proto
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[embedded,gpu,tools,k8s,dev]'
	touch $(STAMP)

# promtool (Prometheus's own checker) and the Prometheus server come from Debian's package; the TLS
# tests make their certificates with the openssl CLI. kubectl (with kustomize) ships with this image.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v openssl >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus openssl >/dev/null; }

prepare: install
	$(BIN)/quantrouter embedded prepare

run: prepare
	$(BIN)/quantrouter serve --embedded

demo: prepare
	$(BIN)/quantrouter demo

test: install tools prepare
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: install prepare
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/quantrouter/v1/*_pb2*
