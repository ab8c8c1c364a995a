# Set-up and the two entry points the README documents, and a developer's fast lane. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where nvcc is found the install builds the GPU kernels (and the CUDA custom op) and requires them:
# YATDEPLOY_CUDA=ON also puts triton, their compiler, into the package build's environment
# (pyproject.toml). Elsewhere AUTO: a CPU-only build, without triton. A value from the environment wins.
YATDEPLOY_CUDA ?= $(if $(shell command -v nvcc 2>/dev/null),ON,AUTO)

.PHONY: demo test check bench install system-deps perf-analyzer triton-ort clean

demo: $(STAMP)
	$(BIN)/yatdeploy demo

test: $(STAMP) system-deps perf-analyzer triton-ort
	$(BIN)/python -m pytest

# The fast lane: every test not marked slow (no server subprocess, engine or native build, training, or export
# of a model of its own; pyproject.toml's markers), in under a minute on 2 cores. `make test` still runs them all.
check: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu_yatgemm.py --repeat 60

install: $(STAMP)

# The install also builds the native parts: rebuild when their sources change (the GPU kernels' too).
NATIVE_SOURCES := $(wildcard custom_ops/CMakeLists.txt custom_ops/cmake/* custom_ops/src/*.* custom_ops/src/*/*.*) \
	yatdeploy/spec.py \
	$(addprefix yatdeploy/gpu/,kernel.py configs.py common.py aot.py host_table.py)
comma := ,
NATIVE_PARTS := the ONNX Runtime custom-op library$(if $(filter ON,$(YATDEPLOY_CUDA)), and (nvcc is here) the GPU kernels$(comma) compiled ahead of time)
# The first run installs and compiles for several minutes: it says so, and pip lists what it fetches as it goes.
$(STAMP): pyproject.toml CMakeLists.txt $(NATIVE_SOURCES)
	@echo "[install 1/3] creating $(VENV) (the first run only: later runs reuse it)"
	$(PYTHON) -m venv $(VENV)
	@echo "[install 2/3] pip installs yatdeploy, torch, ONNX Runtime and the service and test packages, listing each"
	@echo "              as it comes, then builds the native parts with CMake: $(NATIVE_PARTS)."
	@echo "              This takes several minutes on 2 cores, with no output from the build until it ends."
	YATDEPLOY_CUDA=$(YATDEPLOY_CUDA) $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off \
	  -e '.[cpu,service,test]'
	@echo "[install 3/3] installed into $(VENV)"
	touch $(STAMP)

# Debian tools the tests use: docker-compose validates docker-compose.yml (no Docker engine needed) and
# prometheus scrapes a live server. Installed when missing and apt can; otherwise their tests skip.
SYSTEM_TOOLS := docker-compose prometheus
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "note:$$missing not installed and apt-get is not usable here; their tests will skip"; \
	  fi; \
	fi

# NVIDIA's perf_analyzer (the binary in the tritonclient 2.48.0 wheel, with libcudart and libb64 beside it) into
# $(VENV)/tools/perf_analyzer; does nothing when it is already there. Where it can't be had, its test skips.
perf-analyzer: $(STAMP)
	@$(BIN)/python tools/perf_analyzer.py || echo "note: perf_analyzer not installed; tests/test_perf_analyzer.py will skip"

# onnxruntime as Triton's ONNX Runtime backend has it (TRITON_ORT_VERSION: the ort_version of build.py's
# DEFAULT_TRITON_VERSION_MAP in triton-inference-server/server, branch r26.08, Triton 2.72.0 / container 26.08;
# docs/triton.md), with its dependencies, in a folder of its own outside the venv's site-packages:
# tests/test_portable_repository.py loads an exported repository with it in a clean interpreter. Installed once
# per version; where pip can't get it, that test skips.
TRITON_ORT_VERSION := 1.28.0
TRITON_ORT := $(VENV)/triton-ort
triton-ort: $(STAMP)
	@if [ ! -d $(TRITON_ORT)/onnxruntime-$(TRITON_ORT_VERSION).dist-info ]; then \
	  rm -rf $(TRITON_ORT) && \
	  $(BIN)/python -m pip install --disable-pip-version-check --no-warn-conflicts -q --target $(TRITON_ORT) \
	    onnxruntime==$(TRITON_ORT_VERSION) numpy || \
	  { rm -rf $(TRITON_ORT); echo "note: onnxruntime $(TRITON_ORT_VERSION) not installed into $(TRITON_ORT); tests/test_portable_repository.py will skip"; }; \
	fi

clean:
	rm -rf $(VENV) yatdeploy-demo yatdeploy-bench build *.egg-info
