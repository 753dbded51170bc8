VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-privacy demo

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --doctest-modules lightning_privacy tests

# The GPU suite (tests/gpu): runs where CUDA exists; elsewhere every test skips with the reason.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_privacy tests examples benchmarks
	$(VENV)/bin/ruff format --check lightning_privacy tests examples benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV)
