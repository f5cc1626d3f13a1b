# Two entry points a user needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data

.PHONY: setup demo test inspector loso evasion aligner aligner-resume benchmark report tuning clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the CPU build on this machine; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[all,dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pipeline.batch examples/chat_logs.jsonl --out demo_output.jsonl

test: setup
	$(PY) -m pytest -q --durations=15 tests

# The fast tier (no model training, no Ray cluster / Ray Serve, no long CLIs): tests marked slow are skipped.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# Rebuild the bundled default inspector from the real data (same data + seed = same metrics).
# Data choice (sources left out, 2,500 pairs per source at most) and threshold rule: inspector/default_model/README.md.
inspector: setup
	$(PY) -m inspector.train --shared-data $(DATA) --out inspector/default_model --epochs 2 --members 1 --augment 0.3 --span-pooling sentences --edge-length 128 --edge-margin 0.4 --threshold-rule balanced --target-fpr 0.05 --seed 0

# Leave-one-source-out study of the data / threshold recipes (frozen features; ~10 min to embed the first time, then ~6 min).
loso: setup
	$(PY) -m inspector.study --shared-data $(DATA) --out experiments/loso

# Evasion suite on the bundled inspector: harmful test-split answers diluted, injected, disguised.
evasion: setup
	$(PY) -m inspector.evasion --test-split $(DATA) --out experiments/loso/evasion.json

# Train the small CPU aligner into models/aligner-small (git-ignored); stops with a checkpoint at 40 min.
aligner: setup
	$(PY) -m aligner.train --recipe cpu-small --data-dir $(DATA) --out models/aligner-small

aligner-resume: setup
	$(PY) -m aligner.train --out models/aligner-small --resume

benchmark: setup
	$(PY) benchmarks/bench_inspector.py
	$(PY) benchmarks/bench_aligner.py
	$(PY) benchmarks/bench_serve.py

report: setup
	$(PY) -m experiments.report --data examples/labelled_pairs.jsonl --out experiments/output/report

tuning: setup
	$(PY) -m experiments.notebooks experiments/threshold_tuning.ipynb

clean:
	rm -rf $(VENV) demo_output.jsonl
