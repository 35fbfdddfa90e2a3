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

# The whole DAG at CPU size (every override visible here, in params and in MLflow). Chosen by
# measurement on 2 cores (README "Measured"): 5,500 CIFAR-10 images, 550 of them held out for
# validation (the report names the champion on them, never on the test set); a narrowed CNN (3
# blocks of one conv, cosine schedule: with a constant lr its last epoch swung 36-42 %) for 5 epochs
# and a 4-block, 64-wide ViT for 3: ~25 s of training each in fp32 (AVX2), 8.5 s and 22 s under
# bf16 (AVX512-BF16). The GANs see 28,800 MNIST images once: 900 DCGAN steps at half width
# (gan.dcgan.width=32), 62 s on the AVX512 machine. 600 steps left it on the edge of drawing
# digits (FID 93 on the AVX2 machine, 110 on the AVX512 one: float sums apart), 900 gave FID 32.5
# and 1,200 32.4 for 14 s more (2026-12-01). The judge learns from 12,000. SimCLR pre-trains the
# CNN's architecture on 2,500 images for 2 epochs: far too little pre-training to show much
# (README "Measured" gives its probe against random weights).
# The reference configurations are params.yaml's defaults.
CPU_SIZED := -S data.train_fraction=0.11 -S data.val_fraction=0.1 -S data.test_fraction=0.2 \
  -S judge.epochs=1 -S judge.train_fraction=0.2 \
  -S gan.epochs=1 -S gan.train_fraction=0.48 -S gan.sample_every=1 -S gan.fid_every=1 \
  -S gan.fid_samples_during=1000 -S gan.fid_samples=2000 -S gan.dcgan.width=32 \
  -S vit.epochs=3 -S vit.depth=4 -S vit.embed_dim=64 -S vit.heads=2 -S vit.dropout=0.0 \
  -S cnn.epochs=5 -S cnn.scheduler=cosine -S 'cnn.widths=[32,64,128]' -S cnn.convs_per_block=1 -S cnn.hidden=128 \
  -S ssl.arch=refcnn -S 'ssl.widths=[32,64,128]' -S ssl.convs_per_block=1 -S ssl.epochs=2 -S ssl.train_fraction=0.05

.PHONY: install install-test system-packages run test deps
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# A fresh venv's pip (23.2 here) resolves this project in ~50 s; pip 26.3 in ~25 s, to the same
# packages (measured: identical `pip freeze`). Installing it first costs ~5 s.
PIP_VERSION := 26.3
# pip byte-compiles every module it installs: 61 of the install's 95 s here (all of torch, MLflow,
# DVC, ...), while a run imports a fraction of them. So pip skips it (--no-compile) and Python
# writes the bytecode of each module when a recipe first imports it (into __pycache__/ folders:
# git-ignored, never a stage's dep), also where the shell sets PYTHONDONTWRITEBYTECODE, as this
# team's machines do: there every process would otherwise compile all it imports, every time.
unexport PYTHONDONTWRITEBYTECODE

# The interpreter the venv is made from (`make PYTHON=python3.12 ...` picks another): the
# distribution's /usr/bin/python3 when it is 3.10 or newer and can make a venv (Debian: the
# python3-venv package), else python3 from PATH. Most of a test-sized stage is Python importing
# torch and MLflow, and the two build CPython differently: pyenv's default build, this team's
# python3 (3.11.7), is configured without --enable-optimizations; a pure-Python loop takes ~25 %
# less time on Debian's 3.11.2. Measured on the AVX512 machine (2026-12-02), results bit for bit
# the same: the test-sized DAG 72 s instead of 82; the test suite, fresh clones back to back, 322 s
# (509 s of user CPU) instead of 359 s (582 s). An existing .venv keeps its interpreter.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && echo /usr/bin/python3 || echo python3)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

# The tests also need the team extras (the scaleout tests run a PostgreSQL-backed MLflow server
# with S3 artifacts and a DVC S3 remote) and the S3 emulator: one pip call for all of it.
$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
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
# polled, processes it signals), and a third worker fills that time on 2 cores. Measured on the
# AVX512 machine (2026-12-01, BENCHMARKS.md): the tests took 445 s with 2 workers, 396 s with 3,
# 429 s with 4; later, with the longest files first, 406 s with 3 and 420 s with 4. Whole files go
# to a worker (--dist loadfile): their tests build on each other. The longest go first
# (tests/conftest.py LONGEST_FILES, kept in that order by --no-loadscope-reorder).
TEST_WORKERS ?= $(shell python3 -c 'import os; print((os.cpu_count() or 1) + 1)')

test: install-test system-packages
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# dvc.yaml's code deps, written from each stage's import closure (reprovision/tools/deps.py); the
# tests check they are current (tests/test_stage_deps.py).
deps: install
	$(PY) -m reprovision.tools.deps
