# Set-up and the two entry points the README documents. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where nvcc is found the install builds the GPU kernels (and the CUDA custom op) and requires them:
# YATDEPLOY_CUDA=ON also puts triton, their compiler, into the package build's environment
# (pyproject.toml). Elsewhere AUTO: a CPU-only build, without triton. A value from the environment wins.
YATDEPLOY_CUDA ?= $(if $(shell command -v nvcc 2>/dev/null),ON,AUTO)

.PHONY: demo test bench install system-deps clean

demo: $(STAMP)
	$(BIN)/yatdeploy demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu_yatgemm.py --repeat 60

install: $(STAMP)

# The install also builds the native parts: rebuild when their sources change (the GPU kernels' too).
NATIVE_SOURCES := $(wildcard custom_ops/CMakeLists.txt custom_ops/cmake/* custom_ops/src/*.* custom_ops/src/*/*.*) \
	yatdeploy/spec.py \
	$(addprefix yatdeploy/gpu/,kernel.py configs.py common.py aot.py host_table.py)
$(STAMP): pyproject.toml CMakeLists.txt $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	YATDEPLOY_CUDA=$(YATDEPLOY_CUDA) $(BIN)/python -m pip install --disable-pip-version-check -q -e '.[cpu,service,test]'
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

clean:
	rm -rf $(VENV) yatdeploy-demo yatdeploy-bench build *.egg-info
