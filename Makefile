# The two commands of the README: `make demo` and `make test`. Each creates and fills the
# virtual environment on first use (reused afterwards, refreshed when setup.cfg changes).
VENV   ?= .venv
PY     := $(VENV)/bin/python
ORCH   := $(VENV)/bin/orch
STAMP  := $(VENV)/.orch-installed
DATA   ?= data/shapes
DEMO_TRAIN ?= 1000
DEMO_VAL   ?= 200
# Extra `orch submit` options of the demo, e.g. DEMO_FLAGS="--set schedule.iterations=50" (a quick look)
DEMO_FLAGS ?=
# Test processes: many slow tests mostly wait (servers, daemons, outages), so 3 beat 2 cores.
TEST_WORKERS ?= 3

.PHONY: demo test test-fast test-heavy faults install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Main job on the embedded default: synthetic shapes, demo experiment, local backend, MLflow in
# ./mlflow.db; prints the final metrics and the `mlflow ui` command.
demo: $(STAMP)
	$(ORCH) data shapes --out $(DATA) --train $(DEMO_TRAIN) --val $(DEMO_VAL) --seed 0
	$(ORCH) submit experiments/shapes_demo.yaml --backend local --wait $(DEMO_FLAGS)

# The whole suite, slow real-cluster tests included (Slurm, Ray, torchrun, mlflow server), and
# the fault suite's CI seeds (tests/faults; `make faults` runs more).
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 -m "not heavy" -n $(TEST_WORKERS) --dist loadgroup

# Tests whose CPU path takes many minutes (torch.compile's C++ code generation).
test-heavy: $(STAMP)
	$(PY) -m pytest -q -ra -m heavy

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not heavy"

# The seeded fault suite: seeds START..START+N-1 (every (backend, fault) pair once per 24 seeds),
# then the table of RELIABILITY.md (the summary prints even when a scenario failed).
# SEEDS=8,11 reruns those seeds only.
N ?= 24
START ?= 0
SEEDS ?=
FAULTS_RESULTS ?= work_dirs/faults/results.json
faults: $(STAMP)
	@mkdir -p $(dir $(FAULTS_RESULTS))
	ORCH_FAULTS_N=$(N) ORCH_FAULTS_START=$(START) ORCH_FAULTS_SEEDS=$(SEEDS) ORCH_FAULTS_RESULTS=$(FAULTS_RESULTS) \
		$(PY) -m pytest -q -ra -m faults tests/faults; status=$$?; \
		$(PY) tests/faults/summary.py $(FAULTS_RESULTS); exit $$status

clean:
	rm -rf work_dirs $(DATA) mlflow.db mlartifacts
