# garden: `make run` and `make test` create the virtualenv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench lint params settings repro compare ui plots-template clean

install: $(STAMP)

# torch first, pinned: it takes the CPU build on disk instead of pulling the CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m garden $(ARGS)

# Two workers, one test file each at a time (a file's module fixtures, such as test_dvc's study, stay in one
# worker); WORKERS=0 runs the suite in this process (for pdb), WORKERS=auto on one per core.
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist loadfile)

test: install
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench.py $(ARGS)

# The DVC study: params.yaml from conf/study.yaml (what `dvc exp run -S` composes), then every stage.
params: install
	$(PY) -m garden.stages params $(ARGS)

# conf/settings.yaml and docs/settings.md from the settings' schema (src/garden/settings/schema.py).
settings: install
	$(PY) -m garden.settings yaml
	$(PY) -m garden.settings docs

repro: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro $(ARGS)

# `dvc plots show`'s page template with Vega, Vega-Lite and Vega-Embed inlined (pinned, sha256-checked
# npm tarballs), so the page renders offline; needs npm. The result is committed: .dvc/plots/offline.html.
plots-template: install
	$(PY) .dvc/plots/vendor.py

# The MLflow UI on garden's store (the default tracking.uri): http://127.0.0.1:5000, experiment garden.
ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --workers 1

# The latest sweep's runs side by side, logged to its MLflow parent run.
compare: install
	$(PY) -m garden.compare $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
