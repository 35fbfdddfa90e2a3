# Quick start: `make run` (the whole DAG, CPU-sized) and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
# Offline: datasets come from the mirror named by REPROVISION_DATA_MIRROR (see README).
# When unset and ../shared/datasets exists (this team's checkout layout), use that.
ifeq ($(origin REPROVISION_DATA_MIRROR), undefined)
  ifneq ($(wildcard ../shared/datasets/.),)
    export REPROVISION_DATA_MIRROR := $(abspath ../shared/datasets)
  endif
endif

# The whole DAG at CPU size, every override visible here, in params and in MLflow; params.yaml's
# defaults are the reference configurations. 5,500 CIFAR-10 images, 550 held out for validation
# (the champion is named on them); a narrowed CNN (cosine schedule) and ViT; the GANs see 28,800
# MNIST images once, enough for the DCGAN to draw digits; SimCLR far too little to show much.
# Why each size: docs/measurements.md (2026-12-01, 2026-11-23); its figures: BENCHMARKS.md.
CPU_SIZED := -S data.train_fraction=0.11 -S data.val_fraction=0.1 -S data.test_fraction=0.2 \
  -S judge.epochs=1 -S judge.train_fraction=0.2 \
  -S gan.epochs=1 -S gan.train_fraction=0.48 -S gan.sample_every=1 -S gan.fid_every=1 \
  -S gan.fid_samples_during=1000 -S gan.fid_samples=2000 -S gan.dcgan.width=32 \
  -S vit.epochs=3 -S vit.depth=4 -S vit.embed_dim=64 -S vit.heads=2 -S vit.dropout=0.0 \
  -S cnn.epochs=5 -S cnn.scheduler=cosine -S 'cnn.widths=[32,64,128]' -S cnn.convs_per_block=1 -S cnn.hidden=128 \
  -S ssl.arch=refcnn -S 'ssl.widths=[32,64,128]' -S ssl.convs_per_block=1 -S ssl.epochs=2 -S ssl.train_fraction=0.05

.PHONY: install install-test system-packages run test deps lint format
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# A newer pip resolves this project twice as fast as a fresh venv's, to the same packages (docs/make-test-time.md).
PIP_VERSION := 26.3
# pip would byte-compile all of torch, MLflow and DVC, most of the install's time, while a run imports
# a fraction: --no-compile, and Python writes each module's bytecode when first imported (git-ignored
# __pycache__/), also where the shell sets PYTHONDONTWRITEBYTECODE, as this team's machines do.
unexport PYTHONDONTWRITEBYTECODE

# The interpreter the venv is made from (`make PYTHON=python3.12 ...` picks another): the
# distribution's /usr/bin/python3 when it is 3.10 or newer and can make a venv (Debian: the
# python3-venv package), else python3 from PATH. Debian builds CPython with --enable-optimizations,
# pyenv by default does not, and much of a stage is Python importing torch and MLflow
# (docs/make-test-time.md). An existing .venv keeps its interpreter.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
# The venv and its pip, unless `make run` made them already (`venv` over an existing one took 4 s, re-running ensurepip).
NEW_VENV = test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q pip==$(PIP_VERSION); }

$(VENV)/.installed: pyproject.toml
	$(NEW_VENV)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

# The tests also need the team extras (the scaleout tests run a PostgreSQL-backed MLflow server
# with S3 artifacts and a DVC S3 remote) and the S3 emulator: one pip call for all of it.
$(VENV)/.installed-test: pyproject.toml
	$(NEW_VENV)
	$(PY) -m pip install -q --no-compile -e ".[dev,team]"
	touch $@ $(VENV)/.installed

# Debian packages the tests drive for real: Chromium (the report in a browser) and PostgreSQL 15
# (the team server's store; tests/servers.py runs a throwaway cluster). Installed when absent, as
# root (CI, this team's machines); anyone else gets the apt-get line to run.
system-packages:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql-15"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs Debian's $${missing# }: run  sudo apt-get install -y$$missing  and then make test again" >&2; exit 1; fi; \
	  echo "installing Debian's $$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	dvc exp run $(CPU_SIZED)
	@echo "report: reports/report.html   runs: mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db (the report links their page)"

# One pytest-xdist worker per core and one more: much of the suite waits (servers starting, a queue
# polled, processes it signals), and a third worker fills that time (docs/make-test-time.md). Whole files go
# to a worker (--dist loadfile): their tests build on each other. The longest go first
# (tests/conftest.py LONGEST_FILES, kept in that order by --no-loadscope-reorder).
TEST_WORKERS ?= $(shell python3 -c 'import os; print((os.cpu_count() or 1) + 1)')

test: install-test system-packages
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# dvc.yaml's code deps, written from each stage's import closure (reprovision/tools/deps.py); the
# tests check they are current (tests/test_stage_deps.py).
deps: install
	$(PY) -m reprovision.tools.deps

# The formatter and linter (pyproject.toml [tool.ruff]): `make lint` checks, `make format` rewrites.
lint: install-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
