# One-command set-up and runs. `make test` and `make demo` create .venv and install
# everything on first use (a fresh machine needs nothing but Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# pip picks the torch build that matches torchvision (the CUDA one; it runs on CPU too).
	$(PY) -m pip install -e ".[all]"
	touch $(STAMP)

# The whole suite, slow real-data tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Offline demo: distill scikit-learn's digits, evaluate, write the image grid.
demo: $(STAMP)
	$(VENV)/bin/fedcl-dd distill --dataset digits --method dm --ipc 5 --iterations 300 \
		--eval-epochs 300 --eval-models 3 --out runs/demo
	@echo "see runs/demo/grid.png and runs/demo/results.json"

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
