# make demo: the four notebooks, headless, on the bundled sample (artifacts/demo/)
# make test: the test suite (what CI runs)
# make gpu-check: GPU memory and speed at the real 7B shapes, random weights (artifacts/gpu_check.json)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test gpu-check clean

venv: $(VENV)/.installed

# torch first: here its CPU build comes from a local file; left to pip's resolver it would fetch a CUDA build.
# green-score 0.0.12 pins Python ==3.12.1, torch 2.2.2 and transformers 4.40, which would break this stack:
# it is installed without its dependencies; the few it imports are in requirements.txt.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --ignore-requires-python green-score==0.0.12
	touch $@

# make demo VISUAL_TOKENS=tile (or anyres): the same chain in another visual-token mode
demo: venv
	$(PY) -m helpers.run_notebooks --profile demo --out artifacts/demo $(if $(VISUAL_TOKENS),-p VISUAL_TOKENS $(VISUAL_TOKENS))

test: venv
	$(PY) -m pytest -q tests

gpu-check: venv
	$(PY) -m helpers.gpu_check

clean:
	rm -rf artifacts/demo
