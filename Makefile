# wsi-mil — the two commands of the README.
PYTHON ?= python3
NPM    ?= npm
# OpenSeadragon (BSD-3-Clause) for the offline heatmap viewer, from the npm registry
OSD_VERSION   ?= 4.1.1
OSD_INTEGRITY ?= sha512-owU9gsasAcobLN+LM8lN58Xc2VDSDotY9mkrwS/NB6g9KX/PcusV4RZvhHng2RF/Q0pMziwldf62glwXoGnuzg==
OSD_ASSETS    := mil/heatmap/assets/openseadragon
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo-output

.PHONY: demo test lint bench clean viewer-assets

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/wsi-mil demo --out $(DEMO)

test: $(BIN)/.installed viewer-assets
	$(BIN)/python -m pytest

# Fetch OpenSeadragon with `npm pack` (checked against the registry's integrity hash)
# and copy its script, button images and licence into the package data. Without npm
# the heatmap viewer is skipped (its tests say why); set OSD_INTEGRITY= to skip the check.
viewer-assets: $(OSD_ASSETS)/openseadragon.min.js

$(OSD_ASSETS)/openseadragon.min.js:
	@command -v $(NPM) >/dev/null || { echo "npm not found: the heatmap viewer will be skipped"; exit 0; }; \
	set -e; tmp=$$(mktemp -d); \
	(cd $$tmp && $(NPM) pack --silent openseadragon@$(OSD_VERSION) >/dev/null); \
	tgz=$$tmp/openseadragon-$(OSD_VERSION).tgz; \
	if [ -n "$(OSD_INTEGRITY)" ]; then \
	  got="sha512-$$(openssl dgst -sha512 -binary $$tgz | base64 -w0)"; \
	  [ "$$got" = "$(OSD_INTEGRITY)" ] || { echo "openseadragon $(OSD_VERSION): integrity $$got != $(OSD_INTEGRITY)"; rm -rf $$tmp; exit 1; }; \
	fi; \
	tar -xzf $$tgz -C $$tmp; rm -rf $(OSD_ASSETS); mkdir -p $(OSD_ASSETS)/images; \
	cp $$tmp/package/build/openseadragon/openseadragon.min.js $(OSD_ASSETS)/; \
	cp $$tmp/package/build/openseadragon/images/*.png $(OSD_ASSETS)/images/; \
	cp $$tmp/package/LICENSE.txt $(OSD_ASSETS)/LICENSE-openseadragon.txt; \
	echo "$(OSD_VERSION)" > $(OSD_ASSETS)/VERSION; rm -rf $$tmp

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
