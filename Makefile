# Two entry points, each complete on a fresh machine with Python 3.10+ and nothing else:
#   make demo   - set up .venv and run `qfv demo` on scikit-learn's bundled digits
#   make test   - set up .venv and run the test suite (what CI runs, via .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/qfv demo --out qfv-out

test: setup
	$(PY) -m pytest -q -n 2 tests qfv_brevitas

bench: setup
	$(PY) benchmarks/bench_regularizer.py

clean:
	rm -rf $(VENV) qfv-out .pytest_cache
