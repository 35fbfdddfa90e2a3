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

# The whole DAG at CPU size (every override visible here, in params and in MLflow).
CPU_SIZED := -S data.train_fraction=0.02 -S data.test_fraction=0.05 \
  -S judge.epochs=1 -S judge.train_fraction=0.5 \
  -S gan.epochs=3 -S gan.train_fraction=0.05 -S gan.sample_every=1 -S gan.fid_every=1 \
  -S gan.fid_samples_during=1000 -S gan.fid_samples=2000 \
  -S vit.epochs=2 -S cnn.epochs=2

.PHONY: install run test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install
	dvc exp run $(CPU_SIZED)
	@echo "report: reports/report.html   runs: mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

test: install
	$(PY) -m pytest -q -n auto --dist loadfile
