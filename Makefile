# genlab: every target does its own set-up, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test notebooks notebook-outputs pretrained serve clean

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
