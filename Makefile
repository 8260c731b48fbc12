# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ZOOM ?= 19

.PHONY: demo test lint typecheck format bench clean synth soak

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
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python bench/gpu_serving.py; \
	else \
		echo "bench: skipped bench/gpu_serving.py: it needs a CUDA GPU and nvidia-smi lists none here"; \
	fi

clean:
	rm -rf $(VENV) demo-out chipscale-out .pytest_cache examples/demo-model.pt cdk.out
