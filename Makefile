# Two commands do all the set-up:  `make run`  and  `make test`.
# Both create .venv with the pinned dependencies on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install run test test-data test-model test-all lint format clean

help:
	@echo "make run        install (first time) and run the whole pipeline on the default dataset"
	@echo "make test       install (first time) and run the default test suite (< 10 min, CPU)"
	@echo "make test-data  real-data tests on ../shared/data/coco-mini (skipped if absent)"
	@echo "make test-model slow trained-model tests"
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

test-model: $(STAMP)
	$(BIN)/python -m pytest -m model

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "data or model or reliability or not (data or model or reliability)"

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests
	$(BIN)/ruff format --check src pipelines tests

format: $(STAMP)
	$(BIN)/ruff format src pipelines tests
	$(BIN)/ruff check --fix src pipelines tests

clean:
	rm -rf data models reports mlflow.db mlartifacts dvc.lock
