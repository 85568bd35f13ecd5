# wsi-mil — the two commands of the README.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo-output

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/wsi-mil demo --out $(DEMO)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# mypy needs the package under its import name: point it at a link named wsi_mil
	d=$$(mktemp -d) && ln -s "$(CURDIR)" $$d/wsi_mil && MYPYPATH=$$d $(BIN)/mypy -p wsi_mil; \
	  s=$$?; rm -rf $$d; exit $$s

bench: $(BIN)/.installed
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache
