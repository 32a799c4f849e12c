# qemuleak: the two commands for a fresh machine are `make demo` and `make test`.
# Every target installs what is missing first; a second run on a ready machine
# takes seconds.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARCHES ?= all
SERIES ?= all

.PHONY: setup host venv images images-x86_64 demo test lint unit bench clean

setup: host venv images

host:
	@bash images/setup-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] pip install -e .[test]"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

images: host venv
	@$(PY) images/build.py --arch $(ARCHES) --series $(SERIES)

images-x86_64: host venv
	@$(PY) images/build.py --arch x86_64 --series 6.1

demo: images-x86_64
	@$(PY) tools/demo.py

test: setup lint
	@$(PY) -m pytest -q

# undefined names and unused imports fail the build
lint: venv
	@$(PY) -m pyflakes qemuleak tools tests images

unit: venv
	@$(PY) -m pytest -q tests/unit

bench: setup
	@set -e; for b in tools/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
