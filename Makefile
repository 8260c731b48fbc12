# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ZOOM ?= 19

.PHONY: demo test lint format bench clean synth soak

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

# Synthesize the stack offline (no AWS credentials, no Docker): cdk.out/chipscale.template.json.
synth: $(VENV)/.installed-dev node_modules/.installed
	JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION=20 node_modules/.bin/cdk synth --quiet

demo: $(VENV)/.installed-cli
	$(BIN)/python examples/build_demo_model.py -o examples/demo-model.pt
	$(BIN)/chipscale run --source examples/rasterio_cogeo.tif --zoom $(DEMO_ZOOM) \
		--model examples/demo-model.pt --out demo-out

test: $(VENV)/.installed-dev node_modules/.installed lint
	$(BIN)/python -m pytest

# The reliability soak: tests/reliability's load run (make test runs it at 10,000 tiles) at
# SOAK_TILES through the whole local stack; 5-6 minutes for 100,000 on 2 cores. Figures:
# `$(BIN)/python bench/reliability.py --tiles 100000 --load-only`.
SOAK_TILES ?= 100000
soak: $(VENV)/.installed-dev
	CHIPSCALE_SOAK_TILES=$(SOAK_TILES) $(BIN)/python -m pytest tests/reliability -m soak --timeout=3600

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/tile_read.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) demo-out chipscale-out .pytest_cache examples/demo-model.pt cdk.out
