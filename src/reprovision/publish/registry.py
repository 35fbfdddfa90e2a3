"""The model registry: each classifier's versions under `reprovision-<name>`, and the alias `champion`
on the better of the two, so that `mlflow.pyfunc.load_model("models:/<name>@champion")` loads it. The
alias moves only through the gate (`promote`): a run's better classifier must beat the version that
holds it, on the same validation split, by more than `registry.promote_margin`.

The choice reads the validation accuracy only. Without a validation split (`data.val_fraction: 0`,
the references' setting) no champion is named and the alias is left where it was: the test split
reports, it never chooses.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
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
        where = f"; registered as version {self.version} of {self.registered_model}" if self.version else ""
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


@dataclass(frozen=True)
class Promotion:
    """What the gate decided for a candidate champion, and why, with both scores."""

    moved: bool
    why: str
    incumbent: str | None = None  # "reprovision-cnn version 3", the alias's holder before the decision


def _incumbent(client) -> tuple[str, str, dict[str, str]] | None:
    """(registered model, version, its tags) of the version that carries the alias, if any holds it."""
    from mlflow.exceptions import MlflowException

    for name in REGISTERED_MODELS.values():
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                continue  # no such model or no alias on it
            raise
        return name, str(version.version), dict(version.tags)
    return None


def promote(champion: Champion, val_split: str, *, margin: float = 0.0, force: bool = False) -> Promotion:
    """The gate: point the alias `champion` at the candidate's registered version only when it beats the
    version that holds it on the same validation split (`val_split`: data, fraction and seed) by more
    than `margin` (a tie keeps the incumbent), or when `force`. Different splits are not compared. The
    read-compare-set runs under a lock beside the store, so that two runs finishing together are
    decided one after the other; the winner's version is tagged with its score and split."""
    import mlflow

    client = mlflow.MlflowClient(champion.tracking_uri)
    score = champion.scores[champion.model]
    candidate = f"{champion.registered_model} version {champion.version}"
    with _promotion_lock(champion.tracking_uri):
        held = _incumbent(client)
        incumbent = f"{held[0]} version {held[1]}" if held else None
        if held and (held[0], held[1]) == (champion.registered_model, champion.version):
            return Promotion(False, f"{candidate} already carries `{CHAMPION}`", incumbent)
        if held and not force:
            theirs, their_split = held[2].get("val_acc"), held[2].get("val_split")
            if their_split != val_split or theirs is None:
                return Promotion(
                    False,
                    f"`{CHAMPION}` stays on {incumbent}: it was validated on another split "
                    f"({their_split or 'unrecorded'}, this run's: {val_split}), so the scores are not comparable; "
                    "`reprovision promote --force` moves it",
                    incumbent,
                )
            if not score > float(theirs) + margin:
                return Promotion(
                    False,
                    f"`{CHAMPION}` stays on {incumbent}: {100 * float(theirs):.2f} % validation accuracy against "
                    f"this run's {LABELS[champion.model]} {100 * score:.2f} % (it must win by more than "
                    f"{100 * margin:g} points, registry.promote_margin)",
                    incumbent,
                )
        client.set_registered_model_alias(champion.registered_model, CHAMPION, champion.version)
        for key, value in {"champion_by": "val_acc", "val_acc": repr(score), "val_split": val_split}.items():
            client.set_model_version_tag(champion.registered_model, champion.version, key, value)
        for name in REGISTERED_MODELS.values():
            if name != champion.registered_model and CHAMPION in _aliases(client, name):
                client.delete_registered_model_alias(name, CHAMPION)
    if held is None:
        why = f"`{CHAMPION}` set on {candidate} ({100 * score:.2f} % validation accuracy): no version held it"
    elif force:
        why = f"`{CHAMPION}` moved from {incumbent} to {candidate} by `--force`"
    else:
        why = (
            f"`{CHAMPION}` moved from {incumbent} ({100 * float(held[2]['val_acc']):.2f} %) to {candidate} "
            f"({100 * score:.2f} %) on the same validation split"
        )
    return Promotion(True, why, incumbent)


def _aliases(client, name: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.get_registered_model(name).aliases)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return []  # never registered in this store


@contextmanager
def _promotion_lock(tracking_uri: str | None):
    """An exclusive lock for the gate: beside a SQLite store's file, else in the project's root (where a
    team's queue of experiments on one machine resolves). Runs on other machines are not serialised."""
    import fcntl

    from reprovision.core import track_store

    uri = tracking_uri or track_store.tracking_uri(track_store.project_root())
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else track_store.project_root()
    with (folder / ".champion.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
