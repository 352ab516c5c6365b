# Two commands do all the set-up: `make demo` and `make test`.
# Each creates .venv and installs wattwise with what it needs on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wattwise demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python bench/energy.py

lint: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet ruff
	$(VENV)/bin/ruff check cluster profiler estimators tests bench

clean:
	rm -rf $(VENV) build *.egg-info
