# bnfuse: set-up and the jobs people run.  Every target creates .venv if it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: all demo test zoo bench-scripts mutants docs clean

all: demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(VENV)/.extras: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,timm,onnx]'
	touch $(VENV)/.extras

## the main job: convert the shipped example checkpoint and verify it on its validation data
demo: $(STAMP)
	mkdir -p out
	$(BIN)/bnfuse convert examples/digits_cnn.pth --arch examples.digits:DigitsCNN -o out/digits_fused.safetensors --force
	$(BIN)/bnfuse verify examples/digits_cnn.pth out/digits_fused.safetensors --arch examples.digits:DigitsCNN --data examples/digits_val.pt

## the quick test suite (CI runs this): two worker processes for the two cores, one torch thread each
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

## hand-made bugs the suite must catch, each applied to a copy of the package (scripts/mutants.py)
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py

## the tables of README.md and docs/ made from the package's tables (tests/test_docs_tables.py checks them)
docs: $(STAMP)
	$(BIN)/python scripts/docs_tables.py

## the long model-zoo runs (torchvision + timm), not part of CI
zoo: $(VENV)/.extras
	$(BIN)/python -m pytest -q -m zoo

## the benchmarks whose figures are in docs/measured/
bench-scripts: $(VENV)/.extras
	$(BIN)/python scripts/bench_help.py
	$(BIN)/python scripts/bench_fold_vs_fx.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_batch_convert.py
	$(BIN)/python scripts/bench_convert_time.py
	$(BIN)/python scripts/compare_onnxruntime.py
	$(BIN)/python scripts/compare_reparam.py
	$(BIN)/python scripts/bench_scales.py
	$(BIN)/python scripts/bench_horizontal.py
	$(BIN)/python scripts/export_zoo.py
	$(BIN)/python scripts/compare_runtimes.py
	mkdir -p out
	$(BIN)/bnfuse bench --device cpu --json out/bench_cpu.json --markdown out/bench_cpu.md

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
