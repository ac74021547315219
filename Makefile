# genlab: every target does its own set-up, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test gpu-check notebooks notebook-outputs pretrained serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job on the embedded default data (procedural `shapes`, no download needed):
# GAN, VAE and diffusion trained with the same budget and evaluated with the same metrics.
demo: install
	$(VENV)/bin/genlab compare data=shapes preset=cpu

test: install
	$(PY) -m pytest -q

# On a machine with a CUDA GPU (< 8 minutes): the CUDA tests, no host-device sync in any family's training step,
# `genlab bench` per family on cuda and 2000 DDPM steps on CIFAR-10, in one table. Without CUDA it says so and
# measures nothing. Options: make gpu-check GPU_CHECK_ARGS="--steps 500 --parts sync,bench".
gpu-check: install
	$(PY) tests/gpu_check.py $(GPU_CHECK_ARGS)

# The web page and JSON API with the shipped models: http://127.0.0.1:8000 (Ctrl-C stops it).
serve: install
	$(VENV)/bin/genlab serve

# Retrains every shipped model with its family's cpu preset (~25 minutes on 2 cores) and rewrites the manifests.
pretrained: install
	$(VENV)/bin/genlab pretrained action=build

# Writes the student versions of the notebooks (solutions replaced by `raise NotImplementedError`) into
# notebooks/student/, and build/release/: the folder to hand out (student notebooks, START_HERE.md, the wheel).
notebooks: install
	$(VENV)/bin/genlab notebooks --release build/release
	$(PY) -m pip wheel --quiet --no-deps -w build/release .

# Runs every solution notebook in full (not smoke mode; ~10 minutes each at most on 2 cores) and stores its
# outputs, so a reader on the web sees the figures of the current code.
notebook-outputs: install
	$(VENV)/bin/genlab notebooks --outputs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
