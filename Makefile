# xaid: `make serve`, `make test`, `make demo` work on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: serve test demo lint typecheck protos bench clean promtool

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per install profile; a changed pyproject.toml reinstalls.
$(VENV)/.server-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[server,dev,ref]'
	touch $@ $(VENV)/.server-installed

serve: $(VENV)/.server-installed
	$(VENV)/bin/xaid serve $(ARGS)

demo: $(VENV)/.server-installed
	$(PY) tools/demo.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(VENV)/bin/mypy

# promtool (Debian's prometheus package) for the monitoring tests in tests/deploy.
promtool:
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

test: lint typecheck promtool
	$(PY) -m pytest $(ARGS)

protos: $(VENV)/.test-installed
	$(PY) tools/gen_protos.py

bench: $(VENV)/.test-installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
