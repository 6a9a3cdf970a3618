# make demo: the four notebooks, headless, on the bundled sample (artifacts/demo/)
# make test: the test suite (what CI runs), the ten slowest tests last
# make gpu-check: GPU memory and speed at the real 7B shapes, random weights (artifacts/gpu_check.json);
#   MODEL_ID=<hub id or folder> checks another model at its real shapes
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test gpu-check clean

venv: $(VENV)/.installed

# torch first, from the package index: on Linux a large CUDA build unless pip is pointed at a CPU wheel (README).
# green-score 0.0.12 pins Python ==3.12.1, torch 2.2.2 and transformers 4.40, which would break this stack;
# radeval 2.2.1 requires torchvision (PyPI's does not load beside torch 2.13) and stanza, medspacy 1.3.1 pins spacy<3.8
# (so numpy<2) on Python 3.11: all three are installed without their dependencies; what they import is in
# requirements.txt.
# pip's own output is the progress: several minutes on a fresh machine without local wheels.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	@echo "== make venv 1/4: a virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "== make venv 2/4: torch 2.13.0 (the largest download)"
	$(PY) -m pip install torch==2.13.0
	@echo "== make venv 3/4: requirements-dev.txt (transformers, TRL, PEFT, papermill, ...)"
	$(PY) -m pip install -r requirements-dev.txt
	@echo "== make venv 4/4: green-score, radeval and medspacy without their dependencies"
	$(PY) -m pip install --no-deps --ignore-requires-python green-score==0.0.12
	$(PY) -m pip install --no-deps radeval==2.2.1 medspacy==1.3.1
	touch $@
	@echo "== make venv: done"

# make demo VISUAL_TOKENS=tile (or anyres): the same chain in another visual-token mode
demo: venv
	$(PY) -m helpers.run_notebooks --profile demo --out artifacts/demo $(if $(VISUAL_TOKENS),-p VISUAL_TOKENS $(VISUAL_TOKENS))

# two pytest-xdist workers, a test file each, in tests/conftest.py's order (the longest first; xdist would otherwise
# start the files with the most tests first); one torch thread per process, since two workers' thread pools on two
# cores only spin against each other
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 tests

gpu-check: venv
	$(PY) -m helpers.preflight.gpu_check $(if $(MODEL_ID),--model-id $(MODEL_ID))

clean:
	rm -rf artifacts/demo
