# make install     -> .venv with the CPU build of torch and the kit
# make quickstart  -> install, then the embedded CPU default (BabyAI 3-task stream)
# make test        -> install, then pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# the CPU torch wheel: a local folder of wheels where the machine has one (else PyPI's build)
TORCH_WHEELS ?= /opt/wheels
TORCH_SPEC   ?= torch==2.13.0

.PHONY: install quickstart test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -d "$(TORCH_WHEELS)" ]; then \
	  $(PY) -m pip install -q --find-links $(TORCH_WHEELS) "$(TORCH_SPEC)"; \
	else \
	  $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q --find-links $(TORCH_WHEELS) -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) train.py --config configs/quickstart.yaml

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
