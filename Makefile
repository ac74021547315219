# genlab: every target does its own set-up, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per install (the base package, or the package with one set of extras), each redone when pyproject.toml
# changes: `make demo` installs only the base package, and a later `make test` still installs the dev extras.
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev
INSTRUCTOR := $(VENV)/.installed-instructor

.PHONY: install demo test gpu-check notebooks notebook-outputs pretrained serve clean

# Everything: the package with the dev extras (tests, notebooks, grading).
install: $(DEV)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(INSTRUCTOR): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[instructor]"
	touch $@

# The dev extras include the instructor extra (and the base package): their stamps too.
$(DEV): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(BASE) $(INSTRUCTOR)

# The main job on the embedded default data (procedural `shapes`, no download needed):
# GAN, VAE and diffusion trained with the same budget and evaluated with the same metrics.
demo: $(BASE)
	$(VENV)/bin/genlab compare data=shapes preset=cpu

test: $(DEV)
	$(PY) -m pytest -q

# On a machine with a CUDA GPU (< 8 minutes): the CUDA tests, no host-device sync in any family's training step,
# `genlab bench` per family on cuda and 2000 DDPM steps on CIFAR-10, in one table. Without CUDA it says so and
# measures nothing. Options: make gpu-check GPU_CHECK_ARGS="--steps 500 --parts sync,bench".
gpu-check: $(DEV)
	$(PY) tests/gpu_check.py $(GPU_CHECK_ARGS)

# The web page and JSON API with the shipped models: http://127.0.0.1:8000 (Ctrl-C stops it).
serve: $(BASE)
	$(VENV)/bin/genlab serve

# Retrains every shipped model with its family's cpu preset (~25 minutes on 2 cores) and rewrites the manifests.
pretrained: $(BASE)
	$(VENV)/bin/genlab pretrained action=build

# Writes the student versions of the notebooks (solutions replaced by `raise NotImplementedError`) into
# notebooks/student/, and build/release/: the folder to hand out (student notebooks, START_HERE.md, the wheel).
notebooks: $(INSTRUCTOR)
	$(VENV)/bin/genlab notebooks release=build/release
	$(PY) -m pip wheel --quiet --no-deps -w build/release .

# Runs every solution notebook in full (not smoke mode; ~10 minutes each at most on 2 cores) and stores its
# outputs, so a reader on the web sees the figures of the current code.
notebook-outputs: $(DEV)
	$(VENV)/bin/genlab notebooks outputs=true

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
