# Set-up and the two entry points the README documents. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

demo: $(STAMP)
	$(BIN)/yatdeploy demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu_yatgemm.py --repeat 60

install: $(STAMP)

# The install also builds the native library: rebuild when its sources change.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard custom_ops/CMakeLists.txt custom_ops/cmake/* custom_ops/src/* kernels/*) yatdeploy/spec.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[cpu,service,test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) yatdeploy-demo build *.egg-info
