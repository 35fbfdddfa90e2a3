"""What a stage's MLflow run records beyond its params: metrics, artifacts, the data it read, the model
it made, and models/<name>/run.json pointing back at the run. Each call turns the store going away into
TrackingError (track_store.reports_outage).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from reprovision.core.track_store import reports_outage
from reprovision.layout import PREPARED


def log_epoch(metrics: dict[str, float], step: int) -> None:
    log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step)


@reports_outage()
def log_metrics(metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset=None) -> None:
    """Numbers to the active run (non-numbers are left out: they are tags or params), linked to a
    logged model and a dataset when given."""
    import mlflow

    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    mlflow.log_metrics(numbers, step=step, model_id=model_id, dataset=dataset)


@reports_outage()
def log_artifacts(*paths: Path, folder: str | None = None) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


# What the server answers when two runs insert the same dataset at once, by backend store.
DATASET_INSERT_CLASHES = ("UNIQUE constraint failed: datasets", 'violates unique constraint "dataset_pk"')

# MLflow's names for where a dataset was used (its UI shows them beside each input).
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@reports_outage()
def log_datasets(root: Path, dataset: str, sha256: str, images: dict[str, int]) -> dict[str, Any]:
    """The data the active run read, as MLflow dataset inputs: one per split in `images` (train,
    val, test: how many images of it), named `<dataset>-<split>`, with fetch-data's manifest digest
    and its folder as the source. Returns the datasets by split, to link metrics to (MLflow keeps a
    metric's dataset only together with a model_id: evaluate's figures have both)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local source class twice, then warns it can't choose
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str((root / PREPARED / dataset).resolve()))
    found = {}
    for split, count in images.items():
        found[split] = MetaDataset(source, name=f"{dataset}-{split}", digest=sha256[:32])
        tags = {"images": str(count), "sha256": sha256}
        try:
            mlflow.log_input(found[split], context=DATASET_CONTEXTS[split], tags=tags)
        except mlflow.exceptions.MlflowException as err:
            # The store looks a dataset up, then inserts it: two experiments logging the same one at
            # once collide on the insert (SQLite: UNIQUE constraint failed; PostgreSQL: duplicate key
            # ... "dataset_pk"). The other run has made it meanwhile: a second try finds it.
            if not any(clash in str(err) for clash in DATASET_INSERT_CLASHES):
                raise
            time.sleep(0.5)
            mlflow.log_input(found[split], context=DATASET_CONTEXTS[split], tags=tags)
    return found


# The run tags a logged model carries too: what it was trained on, and with which params.
MODEL_TAGS = ("dataset", "data_sha256", "params_sha256")


@reports_outage()
def log_model(
    module,
    *,
    name: str,
    example,
    description: str,
    params: dict[str, Any],
    run_tags: dict[str, str],
    step: int,
    metadata: dict[str, Any] | None = None,
    registered_model_name: str | None = None,
):
    """Log `module` (serving.py's raw-input wrappers) as the active run's logged model `name`, with
    its params and the run's tags that identify what it was trained on, returning its ModelInfo.
    MLflow links the run's metrics of `step` (the shipped epoch's, with their datasets) to it.

    pt2 format (torch.export, batch size left dynamic), so it loads without this package and without
    unpickling; the signature and input example come from `example`, a real input batch of 2 or more.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    module = module.cpu().eval()
    example = example.cpu()
    with torch.no_grad():
        output = module(example)
    with warnings.catch_warnings():
        # torch.export's archive writer rebuilds channels-last (non-contiguous) weights from their storage and
        # warns that this may fail off the CPU; they are on the CPU here (the e2e test serves them).
        warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
        info = mlflow.pytorch.log_model(
            module,
            name=name,
            signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(),
            serialization_format="pt2",
            params={k: str(v) for k, v in params.items()},
            tags={key: run_tags[key] for key in MODEL_TAGS},
            step=step,
            metadata=metadata,
            registered_model_name=registered_model_name,
            # Pinned: otherwise MLflow infers requirements by loading the model once more.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    mlflow.set_tag("mlflow.note.content", description)
    return info


def write_run_ref(path: Path, run, model=None, registered_model: str | None = None) -> dict[str, str]:
    """models/<name>/run.json: the run (and logged model, when given) that made the model in this folder."""
    import mlflow

    ref = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        # Where the run was logged; tracking_uri() would fall back to SQLite if the server had died since.
        "tracking_uri": mlflow.get_tracking_uri(),
        "run_name": run.info.run_name,
        **({"model_id": model.model_id, "model_uri": model.model_uri} if model is not None else {}),
        **(
            {"registered_model": registered_model, "registered_version": str(model.registered_model_version)}
            if registered_model
            else {}
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref, indent=2) + "\n")
    return ref
