# bigkern: `make bench` (the main job) and `make test` do all set-up on a fresh machine.
#   make test       venv + torch/triton + build (CUDA extension when nvcc is found) + the CPU test suite
#   make bench      the same set-up, then the benchmark suite (without a GPU: verification only)
#   make wheel      a wheel with the compiled extension (ARCHS="8.0;9.0a"), smoke-tested in a fresh venv
#   make gpu-check  on a GPU machine with torch, triton and nvcc but no package index:
#                   build, GPU tests, verify, quick benchmark, report; logs and results into $OUT

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := torch numpy pytest pytest-benchmark expecttest ninja pybind11 setuptools wheel matplotlib rich
TEST_DEPS := torchvision timm transformers
SOURCES := setup.py pyproject.toml bench/shapes.json $(shell find csrc -type f 2>/dev/null)

.PHONY: test bench gpu-check install wheel clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(DEPS) $(TEST_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q tests
	$(PY) scripts/build_wheel.py --smoke

wheel: install
	$(PY) scripts/build_wheel.py --smoke $(if $(ARCHS),--archs "$(ARCHS)")

bench: install
	$(PY) -m bigkern bench

gpu-check:
	$(PYTHON) scripts/gpu_check.py

clean:
	rm -rf build dist *.egg-info bigkern/_C*.so bigkern/_build_info.py $(VENV)
