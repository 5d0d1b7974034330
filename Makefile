# Two entry points, each complete on a fresh machine with Python 3.11+ and nothing else:
#   make demo   - set up .venv and run `qfv demo` on scikit-learn's bundled digits
#   make test   - set up .venv with the test, fpga (hls4ml), lightning, llm (transformers) and
#                 snn (spikingjelly) extras, and .venv-finn (finn-plus, for the FINN flow's
#                 tests), and run the test suite (what CI runs, via .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

FINN_VENV ?= .venv-finn

.PHONY: setup setup-test setup-finn demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py qfv_brevitas/csrc/kernels.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	# "$(TORCH)" again: an extra (lightning, llm) that would replace the pinned CPU torch fails here.
	$(PY) -m pip install -q -e ".[test,fpga,lightning,llm]" "$(TORCH)"
	# spikingjelly 2.0 declares torchvision/torchaudio/tensorboard, which would replace the CPU
	# torch by a CUDA build: the snn extra goes in without its declared dependencies.
	$(PY) -m pip install -q --no-deps "spikingjelly>=2.0.0" "loguru>=0.7,<1"
	touch $@

# finn-plus in its own environment (it pins older brevitas/onnx; see export/finn/setup_finn.sh).
# Measured from scratch: 38 s to install, 20 s for its tests (TESTING.md).
setup-finn: $(FINN_VENV)/.installed

$(FINN_VENV)/.installed: export/finn/setup_finn.sh pyproject.toml
	FINN_VENV=$(FINN_VENV) TORCH="$(TORCH)" bash export/finn/setup_finn.sh
	touch $@

demo: setup
	$(VENV)/bin/qfv demo --out qfv-out --force

test: setup-test setup-finn
	QFV_FINN_PYTHON=$(abspath $(FINN_VENV))/bin/python $(PY) -m pytest -q -n 2 tests qfv_brevitas

bench: setup
	$(PY) benchmarks/bench_regularizer.py

clean:
	rm -rf $(VENV) $(FINN_VENV) qfv-out .pytest_cache
