VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu lint install system-deps clean

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

# System packages the tests use: Chromium (Debian's `chromium`) for the report's render test.
# Installed with apt-get as root or through passwordless sudo; where neither works it says so and
# goes on (that test then skips with the reason). `.ci/run` runs it before `make test`.
system-deps:
	@if command -v chromium >/dev/null 2>&1; then \
	  echo "system-deps: chromium found ($$(command -v chromium))"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "system-deps: no apt-get here; chromium not installed (the report's render test skips)"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "system-deps: apt-get needs root; chromium not installed (the render test skips)"; \
	  elif $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install \
	      -y -qq --no-install-recommends chromium >/dev/null; then \
	    echo "system-deps: chromium installed ($$(command -v chromium))"; \
	  else \
	    echo "system-deps: apt-get could not install chromium (the render test skips)"; \
	  fi; \
	fi

# The GPU suite (tests/gpu): runs where CUDA exists; elsewhere every test skips with the reason.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_privacy tests examples benchmarks
	$(VENV)/bin/ruff format --check lightning_privacy tests examples benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV)
