# Two commands do all the set-up:  `make run`  and  `make test`.
# Both create .venv with the pinned dependencies on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-data test-reliability test-scale test-ci test-all gpu-check bench bench-quick bench-scale bench-paper lint format clean

help:
	@echo "make run        install (first time) and run the whole pipeline on the default dataset"
	@echo "make test       install (first time) and run the default test suite (< 10 min, CPU)"
	@echo "make test-data  real-data tests on ../shared/data/coco-mini (skipped if absent)"
	@echo "make test-reliability  fault-injection suite (kills, a vanishing tracking server, ...)"
	@echo "make test-scale scale-out suite (parallel variants, mlflow server, shared DVC remote)"
	@echo "make test-ci    what CI (.ci/run) runs after a fresh install: make test, test-scale, test-data, test-reliability"
	@echo "make gpu-check  on a GPU machine: AMP training of every variant, DDP, device leases, serving (< 5 min)"
	@echo "make bench      benchmarks (the papers' comparisons; writes benchmarks/results.md, .json)"
	@echo "make bench-quick  the same, short (CPU, about 22 min); or: make bench ARGS=--quick"
	@echo "make bench-scale  the cost curve: stages at 400/4000/20000 images, COCO projected (< 30 min)"
	@echo "make bench-paper  the papers' comparisons at their scale on real photos, vs torchvision (< 40 min)"
	@echo "make lint       ruff lint + format check"
	@echo "make clean      remove pipeline outputs (data/, models/, reports/, mlflow.db)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rcnnops run

test: $(STAMP)
	$(BIN)/python -m pytest

test-data: $(STAMP)
	$(BIN)/python -m pytest -m data

test-reliability: $(STAMP)
	$(BIN)/python -m pytest -m reliability

test-scale: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,team,team-test]"
	$(BIN)/python -m pytest -m scale

test-ci: test test-scale test-data test-reliability

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "data or reliability or scale or not (data or reliability or scale)"

gpu-check: $(STAMP)
	$(BIN)/python -m pipelines.gpu_check $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick $(ARGS)

bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks --scale $(ARGS)

bench-paper: $(STAMP)
	$(BIN)/python -m benchmarks --paper $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests benchmarks
	$(BIN)/ruff format --check src pipelines tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src pipelines tests benchmarks
	$(BIN)/ruff check --fix src pipelines tests benchmarks

clean:
	rm -rf data models reports mlflow.db mlartifacts dvc.lock
