# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.normlab-installed
OUT     ?= runs

.PHONY: setup demo test lint unit docs bench data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch is pinned to the local CPU wheel; plain `torch` would pull GBs of CUDA packages.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[lab,dev]"
	# the fused C++ kernels, compiled once now instead of on a first forward (never fatal)
	-$(BIN)/python -m normlab.kernels build
	touch $(STAMP)

setup: $(STAMP)

# The main job: the lab's quick suite on the embedded digits data, then the report.
demo: setup
	$(BIN)/normlab lab run all --quick --out $(OUT) --workers 2
	$(BIN)/normlab lab report --out $(OUT)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src

# the tests, and every docstring's example as a doctest (testpaths: tests and src/normlab)
unit: setup
	$(BIN)/python -m pytest -q

# the API reference (MkDocs + mkdocstrings) in build/site; --strict: a broken reference fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint unit docs

bench: setup
	$(BIN)/normlab bench

# Optional real data for the lab: Fashion-MNIST from Debian (needs apt and root).
data:
	@if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make data needs apt-get (Debian/Ubuntu). Otherwise put the Fashion-MNIST IDX files in a folder and pass --data-dir." >&2; exit 1; fi
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make data installs the Debian package dataset-fashion-mnist and needs root: run 'sudo make data'." >&2; exit 1; fi
	apt-get update && apt-get install -y dataset-fashion-mnist
	@ls /usr/share/datasets/fashion-mnist 2>/dev/null || find /usr/share/datasets -maxdepth 2 -iname '*fashion*'

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
