# Two commands for a newcomer: `make demo` (set up + run the demo chain), `make test` (set up + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision pinned per CPU architecture, installed before the package so that its
# `torch>=2.4` requirement is met by these builds rather than by the newest release.
ifeq ($(shell uname -m),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install browser demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/softcurate run configs/demo.yaml

# Debian's Chromium for the report's browser test (Playwright drives it; it never downloads a browser).
browser:
	@test -x /usr/bin/chromium || { \
	  command -v apt-get >/dev/null || { echo "no apt-get: install Chromium as /usr/bin/chromium" >&2; exit 1; }; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: install browser
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python bench/shard.py

clean:
	rm -rf $(VENV) data .pytest_cache
