"""The model registry: each classifier's versions under `reprovision-<name>`, and the alias `champion`
on the better of the two, so that `mlflow.pyfunc.load_model("models:/<name>@champion")` loads it.

The choice reads the validation accuracy only. Without a validation split (`data.val_fraction: 0`,
the references' setting) no champion is named and the alias is left where it was: the test split
reports, it never chooses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reprovision.layout import CLASSIFIERS, LABELS, METRICS, MODELS, REGISTERED_MODELS, RUN_REF, SUMMARY

CHAMPION = "champion"
NO_VALIDATION = (
    "No champion is named: no validation split was held out (data.val_fraction: 0), and the test split "
    "never chooses. Hold one out to choose, e.g. `dvc exp run -S data.val_fraction=0.1`."
)


@dataclass(frozen=True)
class Champion:
    model: str  # a classifier family (config.CLASSIFIERS)
    scores: dict[str, float]  # the validation accuracy of every candidate
    registered_model: str | None = None  # and its version, when the run registered one
    version: str | None = None
    tracking_uri: str | None = None  # of the store that holds it

    @property
    def uri(self) -> str | None:
        return f"models:/{self.registered_model}@{CHAMPION}" if self.registered_model else None

    def sentence(self) -> str:
        scores = " vs ".join(f"{LABELS[m]} {100 * s:.2f} %" for m, s in self.scores.items())
        where = (
            f"; version {self.version} of {self.registered_model} carries the alias `{CHAMPION}`"
            if self.version
            else ""
        )
        return f"{LABELS[self.model]}, by validation accuracy: {scores}{where}."


def choose(records: dict[str, dict]) -> Champion | None:
    """The champion among the classifiers' records (metrics/<name>/summary.json) by validation accuracy;
    None without two classifiers or without a validation split (see `why_no_champion`)."""
    if len(records) < 2 or not all("val_acc" in r for r in records.values()):
        return None
    scores = {m: float(r["val_acc"]) for m, r in records.items()}
    return Champion(model=max(scores, key=scores.get), scores=scores)  # a tie: the first


def why_no_champion(records: dict[str, dict]) -> str | None:
    """Why two trained classifiers name no champion (no validation split), else None."""
    return NO_VALIDATION if len(records) >= 2 and choose(records) is None else None


def read_records(root: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The summaries and run references of the classifiers trained in `root`."""
    records, refs = {}, {}
    for model in CLASSIFIERS:
        summary, ref = root / METRICS / model / SUMMARY, root / MODELS / model / RUN_REF
        if summary.exists() and ref.exists():
            records[model], refs[model] = json.loads(summary.read_text()), json.loads(ref.read_text())
    return records, refs


def read_champion(root: Path) -> Champion | None:
    """The champion of the classifiers trained in `root`, with its registered version when it has one."""
    records, refs = read_records(root)
    champion = choose(records)
    if champion is None or "registered_version" not in refs[champion.model]:
        return champion
    ref = refs[champion.model]
    return Champion(
        champion.model, champion.scores, ref["registered_model"], ref["registered_version"], ref["tracking_uri"]
    )


def promote(champion: Champion) -> None:
    """Point the alias `champion` at the champion's registered version; take it off the other classifier."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(champion.tracking_uri)
    client.set_registered_model_alias(champion.registered_model, CHAMPION, champion.version)
    client.set_model_version_tag(champion.registered_model, champion.version, "champion_by", "val_acc")
    for model, name in REGISTERED_MODELS.items():
        if model == champion.model:
            continue
        try:
            if CHAMPION in client.get_registered_model(name).aliases:
                client.delete_registered_model_alias(name, CHAMPION)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # else: never registered in this store
