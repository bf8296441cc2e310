# Two commands do all the set-up: `make demo` and `make test`. Both create .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# A small public Hugging Face model; where ../shared holds the real stories260K (offline
# machines), that local folder is the default instead. Override: make demo MODEL=path/or/id
HUB_DEMO := HuggingFaceTB/SmolLM2-135M
MODEL   ?= $(if $(wildcard ../shared/models/stories260K/config.json),../shared/models/stories260K,$(HUB_DEMO))
ATLAS   ?= atlas/$(notdir $(MODEL))
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned (the CPU build); the project's range accepts it,
# so installing the project afterwards pulls no other torch.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flashlens map $(MODEL) -o $(ATLAS)
	$(BIN)/flashlens show $(ATLAS) 2:7 --matrix up
	$(BIN)/flashlens stats $(ATLAS) --plot $(ATLAS)/stats.png
	@echo "atlas in $(ATLAS); per-layer plot in $(ATLAS)/stats.png; browse: $(BIN)/flashlens serve $(ATLAS)"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/map_bench.py

clean:
	rm -rf $(VENV) atlas .pytest_cache .mypy_cache .ruff_cache
