# qadapter: `make run` executes the notebook series, `make test` runs the tests and every notebook under nbval.
# Both create the environment (.venv, Python 3.11 + pip) first if it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch for CI and local runs (already on this machine's disk; no multi-GB CUDA download).
TORCH  ?= torch==2.13.0
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# pytest on 2 workers; --dist loadfile keeps each notebook's cells (and each test module) in one worker
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile
LINT   := $(BIN)/ruff check qadapter_utils tests scripts benchmarks
NBVAL  := --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout=900
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND := module://matplotlib_inline.backend_inline

.PHONY: help env run refresh-notebooks execute-notebooks test test-package test-notebooks gpu-notebooks colab-links lab tiny-model compat-matrix clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

env: $(STAMP)  ## create .venv with the pinned stack and qadapter_utils (editable)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

run: $(STAMP)  ## execute every notebook in order on the embedded tiny model into build/run/ (your checkout stays as it is)
	@$(MAKE) --no-print-directory execute-notebooks DEST=$(CURDIR)/build/run

refresh-notebooks: $(STAMP)  ## maintainers: re-execute every notebook in place and clean it (the committed outputs)
	@$(MAKE) --no-print-directory execute-notebooks DEST=

execute-notebooks:
	@mkdir -p $(or $(DEST),notebooks)
	@for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; start=$$(date +%s); \
	  (cd notebooks && ../$(BIN)/jupyter nbconvert --to notebook --execute \
	     $(if $(DEST),--output-dir $(DEST),--inplace) \
	     --ExecutePreprocessor.timeout=1800 --log-level=WARN $$(basename $$nb)) || exit 1; \
	  $(BIN)/python scripts/clean_notebooks.py $(if $(DEST),$(DEST)/$$(basename $$nb),$$nb); \
	  echo "   $$(( $$(date +%s) - start )) s"; \
	done
	@$(if $(DEST),echo "executed notebooks in $(DEST)/ (make refresh-notebooks updates the committed ones)",true)

test: $(STAMP)  ## ruff, then tests/ and nbval over every notebook
	$(LINT)
	$(PYTEST) tests $(NBVAL) $(NOTEBOOKS)

test-package: $(STAMP)  ## ruff and tests/ (no notebooks)
	$(LINT)
	$(PYTEST) tests

test-notebooks: $(STAMP)  ## only nbval over every notebook
	$(PYTEST) $(NBVAL) $(NOTEBOOKS)

gpu-notebooks: $(STAMP)  ## on a CUDA GPU: every notebook as on a Colab T4 (14.75 GiB, 14.15 for PyTorch, fp16), Llama-2-7B shape; table in build/gpu-notebooks
	QADAPTER_MODEL=$${QADAPTER_MODEL:-random:llama2-7b} $(BIN)/python scripts/run_notebooks.py --t4 --out build/gpu-notebooks

colab-links: $(STAMP)  ## point every Colab badge and install cell at pyproject.toml's [project.urls] Repository
	$(BIN)/python scripts/colab_links.py

lab: $(STAMP)  ## open JupyterLab with this environment's kernel
	cd notebooks && ../$(BIN)/jupyter lab

tiny-model: $(STAMP)  ## regenerate the embedded tiny Llama 2 (a few minutes on 2 cores)
	$(BIN)/python -m qadapter_utils.tiny.build

compat-matrix: $(STAMP)  ## regenerate docs/compat_matrix.md and .json
	$(BIN)/python -m qadapter_utils.compat

clean:  ## remove the environment and caches (never touches notebooks, adapters or checkpoints you saved)
	rm -rf $(VENV) .pytest_cache build *.egg-info
