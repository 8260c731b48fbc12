# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ZOOM ?= 19

.PHONY: demo demo-segmentation test lint typecheck format bench clean synth soak vendor browser stac-api

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra set: a change to pyproject.toml reinstalls. `cli` is every extra the
# README's commands need (in-process model, TorchServe, PostgreSQL, AWS, GeoParquet).
$(VENV)/.installed-cli: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cli]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-cli

# The AWS CDK CLI, pinned by package-lock.json (npm's `latest` aws-cdk is a stale 3.0.0).
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# The viewer's map library (chipscale view): Leaflet from node_modules (package.json pins it),
# copied into the package data, checked in, so a pip-installed chipscale serves it offline.
VENDOR := chipscale/view/static/vendor/leaflet
vendor: node_modules/.installed
	rm -rf $(VENDOR) && mkdir -p $(VENDOR)/images
	cp node_modules/leaflet/dist/leaflet.js node_modules/leaflet/dist/leaflet.css \
		node_modules/leaflet/LICENSE node_modules/leaflet/package.json $(VENDOR)/
	cp node_modules/leaflet/dist/images/*.png $(VENDOR)/images/

# Synthesize the stack offline (no AWS credentials, no Docker): cdk.out/chipscale.template.json.
synth: $(VENV)/.installed-dev node_modules/.installed
	JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION=20 node_modules/.bin/cdk synth --quiet

demo: $(VENV)/.installed-cli
	$(BIN)/python examples/build_demo_model.py -o examples/demo-model.pt
	$(BIN)/chipscale run --source examples/rasterio_cogeo.tif --zoom $(DEMO_ZOOM) \
		--model examples/demo-model.pt --out demo-out

# The per-pixel demo (a segmentation model with a 16 px margin): class mask and polygons.
demo-segmentation: $(VENV)/.installed-cli
	$(BIN)/python examples/build_demo_model.py --task segmentation -o examples/demo-segmentation.pt
	$(BIN)/chipscale run --source examples/rasterio_cogeo.tif --zoom $(DEMO_ZOOM) \
		--model examples/demo-segmentation.pt --out demo-seg-out

test: $(VENV)/.installed-dev node_modules/.installed lint browser stac-api
	$(BIN)/python -m pytest

# The real STAC API of tests/test_stac_sources.py (tests/stac_api.py): PostGIS for the local
# PostgreSQL (Debian's package) and .venv-stac (stac-fastapi-pgstac, pypgstac, uvicorn at
# tests/stac-requirements.txt's pins, apart from .venv). Well under a second once done.
# Without root it says what is missing and the tests report it (a failure under CI=true).
stac-api:
	@PYTHON=$(PYTHON) scripts/_stac-test-setup || echo "make stac-api: the STAC API set-up failed (see above)"

# Headless Chromium for tests/test_view_browser.py: Debian's package, driven by Playwright
# (whose own browser download cannot reach the internet). Without root it is left to the
# test, which reports it (a failure under CI=true).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "make browser: could not install Debian's chromium (root needed)"

# The reliability soak: tests/reliability's load run (make test runs it at 10,000 tiles) at
# SOAK_TILES through the whole local stack; 5-6 minutes for 100,000 on 2 cores. Figures:
# `$(BIN)/python bench/reliability.py --tiles 100000 --load-only`.
SOAK_TILES ?= 100000
soak: $(VENV)/.installed-dev
	CHIPSCALE_SOAK_TILES=$(SOAK_TILES) $(BIN)/python -m pytest tests/reliability -m soak --timeout=3600

# ruff, then mypy over chipscale/, model_server/, lambdas/ and stacks/ ([tool.mypy] in
# pyproject.toml, strict).
lint: $(VENV)/.installed-dev typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark that can run on this machine (each prints its JSON; all but tile_read also
# write bench/results/). bench/resnet_model.py is serving's model, not a benchmark.
# bench/gpu_serving.py needs a CUDA GPU: it runs only where nvidia-smi lists one.
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/tile_read.py
	$(BIN)/python bench/pipeline.py -o bench/results/pipeline.json
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/handler_decode.py
	$(BIN)/python bench/push.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/store_versions.py
	$(BIN)/python bench/reliability.py
	$(BIN)/python bench/viewer.py
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python bench/gpu_serving.py; \
	else \
		echo "bench: skipped bench/gpu_serving.py: it needs a CUDA GPU and nvidia-smi lists none here"; \
	fi

clean:
	rm -rf $(VENV) .venv-stac demo-out demo-seg-out chipscale-out .pytest_cache examples/demo-model.pt \
		examples/demo-segmentation.pt cdk.out
