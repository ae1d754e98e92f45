# Everything installs into .venv; torch is the CPU wheel 2.13.0, installed before the package so that
# nothing can pull a CUDA build of torch.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# The FID libraries tests/test_fid_conventions.py checks mfrae against, installed with --no-deps: each requires
# torchvision, which would pull a CUDA torch (the tests import only their torchvision-free modules).
FID_PEERS := torch-fidelity==0.4.0 pytorch-fid==0.3.0 clean-fid==0.1.35

.PHONY: install demo test test-all clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]' "$(TORCH)"
	$(PY) -m pip install --quiet --no-deps $(FID_PEERS)
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "error: a CUDA torch was pulled in" >&2; exit 1; fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mfrae demo --out runs/demo

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
