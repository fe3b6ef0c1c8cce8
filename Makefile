# Two commands do everything on a fresh Debian-like machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 5006
PYTEST_ARGS ?=

.PHONY: serve test env test-env lint unit integration ui system-deps clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "smartswitch needs Python >= 3.11 (found $$($(PYTHON) --version)); set PYTHON=python3.11"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || \
		{ echo "python venv module missing: apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Test tools (pytest, Playwright, ...) only for `make test`: serving needs none of them.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

env: $(VENV)/.installed

test-env: $(VENV)/.installed-test

serve: env
	$(VENV)/bin/smartswitch serve --host $(HOST) --port $(PORT)

# Chromium for the browser tier; a real vLLM (CPU build) and tiny local models for the vLLM tier,
# made once and cached outside the repo (~3.5 GB, a few minutes the first time).
system-deps:
	bash scripts/system_deps.sh
	bash scripts/setup_docker.sh
	bash scripts/setup_vllm.sh

lint: test-env
	$(VENV)/bin/ruff check dashboard tests benchmarks scripts

test: test-env system-deps lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
