"""Record a finished reference-scale run in benchmarks/reference_scale.json, beside the seeds' figures.

A reference-scale run is the pipeline itself on the reference params (full data), with only
`threads` / `precision` overridden, visibly, in a clone of its own so that it can run for hours
beside other work:

    git clone . ../ref && cd ../ref && make install
    dvc exp run -n ref-r1-mlp -S threads=1 train-gan@mlp     # killed? run it again: it resumes
    python benchmarks/reference_scale.py record --repo ../ref --model mlp      # from this checkout

`record` reads what the run wrote (metrics/, models/<m>/run.json, params.yaml, dvc.lock) and the
MLflow run it logged, and writes one entry per model (a GAN's 10x10 grid is copied into
benchmarks/reference_scale/, for the report); `table` prints the Markdown table that
BENCHMARKS.md shows. A run that is still under way (a run of hours advances only while its machine
is up) is recorded with `progress`: the epochs so far, from the checkpoint it resumes from, shown
as "4 of 30" (a GAN's with its D/G losses and the FID curve so far, no final FID yet); `record`
replaces that entry when the run ends. A run that can no longer resume (its checkpoint went with
its machine: checkpoints are not DVC outputs and live only in the clone) is marked with `stopped
--why "..."`: its entry keeps the epochs it reached, shown as stopped; a new run starts afresh, and
when it is recorded the stopped one stays beside it, in its entry's `earlier_runs`.

A repeated run (airbench94 over five seeds, issue 35) is recorded seed by seed with `record-seed --repo
../ref --model cnn --exp-seconds S` (S: the whole `dvc exp run`, timed by whoever ran it): the entry
is named by the architecture and lists one run per seed with their spread; a seed recorded again
replaces its run, which stays in that seed's `earlier_runs`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import yaml

from reprovision.core.track_store import experiment_name, tracking_uri
from reprovision.layout import (
    CHECKPOINTS,
    CLASSIFIERS,
    GAN_MODELS,
    GANS,
    METRICS,
    MODELS,
    REFERENCE_SCALE,
    REFERENCE_SCALE_PICTURES,
    SUMMARY,
)
from reprovision.publish.references import ARCHITECTURE_REFERENCE, REFERENCE

RESULTS = Path(__file__).resolve().parents[1] / REFERENCE_SCALE


def stage_record(folder: Path, model: str) -> dict:
    """A training stage's whole record: <folder>/<model>/summary.json, or <folder>/<model>.json as
    runs from before that split wrote it (a long run may have started on an older commit)."""
    path = folder / model / SUMMARY
    return json.loads((path if path.exists() else folder / f"{model}.json").read_text())


def stage_figure(metrics: dict, name: str) -> float | None:
    """A training stage's test figure of the weights it shipped: summary.json's `monitor_<name>`, or
    `<name>` as runs from before evaluate's test accuracy became the one wrote it. A reference-scale run
    trains only (no evaluate stage): this is its figure, under the precision it trained in."""
    return metrics.get(f"monitor_{name}", metrics.get(name))


def history(path: Path) -> list[dict]:
    with path.open() as fh:
        return [
            {k: (float(v) if k != "epoch" else int(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)
        ]


def mlflow_run(repo: Path, model: str) -> dict:
    ref = MODELS / (model if model in CLASSIFIERS else f"gan/{model}") / "run.json"
    run_ref = json.loads((repo / ref).read_text())
    import mlflow

    run = mlflow.MlflowClient(run_ref["tracking_uri"]).get_run(run_ref["run_id"])
    return {"run_id": run.info.run_id, "tags": run.data.tags, "params": run.data.params}


def newest_stage_run(repo: Path, model: str) -> dict:
    """The newest run of `model`'s training stage in the repo's store (a run under way has no run.json yet)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(repo))
    experiment = client.get_experiment_by_name(experiment_name())
    # The GANs share the stage train-gan; its runs name the model (gan-mlp, gan-dcgan).
    if model in CLASSIFIERS:
        stage, query = f"train-{model}", f"tags.stage = 'train-{model}'"
    else:
        stage, query = f"train-gan@{model}", f"tags.stage = 'train-gan' and tags.model = 'gan-{model}'"
    found = experiment and client.search_runs(
        [experiment.experiment_id],
        query,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise SystemExit(
            f"no {stage} run in {tracking_uri(repo)}: record from the store the run logged to (MLFLOW_TRACKING_URI)"
        )
    return {"run_id": found[0].info.run_id, "tags": found[0].data.tags, "params": found[0].data.params}


def run_entry(model: str, run: dict) -> dict:
    """The fields every entry takes from its MLflow run (mlflow_run / newest_stage_run)."""
    return {
        "model": model,
        "source": REFERENCE[model]["source"],
        "dvc_exp_name": run["tags"].get("dvc_exp_name", ""),
        "git_commit": run["tags"]["git_commit"],
        "mlflow_run_id": run["run_id"],
        "threads": int(run["tags"]["threads"]),
        "device": run["tags"]["device"],
    }


def save(model: str, entry: dict) -> dict:
    """`entry` as `model`'s entry in RESULTS, the other models' entries kept. A stopped run that a new
    run of the model replaces moves to the new entry's `earlier_runs`, newest first. Only `stopped`
    tells a new run from the same run going on: each resumed attempt logs an MLflow run of its own."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old = results.get(model) or {}
    earlier = old.pop("earlier_runs", [])
    if old.get("status") == "stopped" and old.get("mlflow_run_id") != entry.get("mlflow_run_id"):
        earlier = [old, *earlier]
    entry = {k: v for k, v in entry.items() if k != "earlier_runs"} | ({"earlier_runs": earlier} if earlier else {})
    results[model] = entry
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return entry


def record(repo: Path, model: str) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    run = mlflow_run(repo, model)
    entry = run_entry(model, run)
    if model in CLASSIFIERS:
        metrics = stage_record(repo / METRICS, model)
        rows = history(repo / METRICS / model / "history.csv")
        entry |= {
            "epochs": len(rows),
            "epochs_planned": params[model]["epochs"],
            "train_images": int(run["params"]["train_images"]),
            "precision": run["params"]["precision_resolved"],
            "test_acc": stage_figure(metrics, "test_acc"),
            "seconds": metrics["train_seconds"],
            "history": rows,
        }
    else:
        metrics = stage_record(repo / METRICS / "gan", model)
        rows = history(repo / METRICS / "gan" / model / "history.csv")
        fid_curve = [
            row
            for row in history(repo / METRICS / "gan" / model / "fid.csv")
            if math.isfinite(row.get("fid", math.nan))
        ]
        entry |= {
            "epochs": metrics["epochs"],
            "train_images": int(round(params["gan"]["train_fraction"] * 60_000)),
            "precision": "fp32",  # the GAN loop has no autocast
            "fid": metrics["fid"],
            "fid_floor": metrics["fid_floor"],
            "inception_score": metrics["inception_score"],
            "inception_score_real": metrics["inception_score_real"],
            "kl_uniform": metrics["kl_uniform"],
            "fid_n": metrics["n"],
            "seconds": metrics["total_seconds"],
            "history": rows,
            "fid_curve": fid_curve,
            "grid": keep_picture(repo / GAN_MODELS / model / "grid_10x10.png", f"{model}_grid_10x10.png"),
        }
    return save(model, entry)


def record_seed(repo: Path, model: str, exp_seconds: float, note: str = "") -> dict:
    """One seed of a repeated classifier run (airbench94's five seeds, issue 35), under its architecture's
    name: the entry lists one run per seed and their spread. `seconds` is training plus the test-time-
    augmented evaluation (the stage's wall clock for both); `exp_seconds` the whole `dvc exp run`."""
    import statistics

    params = yaml.safe_load((repo / "params.yaml").read_text())
    run = mlflow_run(repo, model)
    metrics = stage_record(repo / METRICS, model)
    acc, plain = stage_figure(metrics, "test_acc"), stage_figure(metrics, "test_acc_plain")
    arch = run["params"]["arch"]
    seed_run = run_entry(model, run) | {
        "model": arch,
        "family": model,  # the classifier family it ran as (cnn, vit)
        "source": ARCHITECTURE_REFERENCE.get(arch, {}).get("source", ""),
        "seed": params["seed"],
        "epochs": metrics["epochs_trained"],
        "train_images": int(run["params"]["train_images"]),
        "precision": run["params"]["precision_resolved"],
        "test_acc": acc,
        "test_acc_plain": acc if plain is None else plain,
        "train_seconds": metrics["train_seconds"],
        "tta_seconds": metrics.get("tta_seconds", 0.0),
        "seconds": metrics["train_seconds"] + metrics.get("tta_seconds", 0.0),
        "exp_seconds": exp_seconds,
        **({"note": note} if note else {}),
        "history": history(repo / METRICS / model / "history.csv"),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = results.get(arch, {}).get("runs", [])
    replaced = next((r for r in runs if r["seed"] == seed_run["seed"]), None)
    if replaced:  # a seed run again: the run it replaces stays beside it in `earlier_runs`, newest first
        seed_run["earlier_runs"] = [replaced, *replaced.pop("earlier_runs", [])]
    runs = sorted([*(r for r in runs if r is not replaced), seed_run], key=lambda r: r["seed"])
    accs = [r["test_acc"] for r in runs]
    results[arch] = {
        "model": arch,
        "runs": runs,
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_min": min(accs),
        "test_acc_max": max(accs),
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "seconds_max": max(r["seconds"] for r in runs),
    }
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results[arch]


def keep_picture(source: Path, name: str) -> str:
    """Copy a run's picture beside RESULTS (the run's clone may not outlive it); its path in a checkout."""
    if not source.exists():
        raise SystemExit(f"{source} not found: record a GAN run once its train-gan stage has finished in that clone")
    folder = RESULTS.with_suffix("")  # benchmarks/reference_scale/ beside benchmarks/reference_scale.json
    folder.mkdir(exist_ok=True)
    shutil.copyfile(source, folder / name)
    return (REFERENCE_SCALE_PICTURES / name).as_posix()


def progress(repo: Path, model: str) -> dict:
    """A reference run still under way: its epochs so far (the rows of the checkpoint it resumes
    from) and what its MLflow run logged when it started (the newest run of its stage)."""
    import torch

    ckpt = repo / CHECKPOINTS / (f"{model}.pt" if model in CLASSIFIERS else f"gan-{model}.pt")
    if not ckpt.exists():
        raise SystemExit(f"{ckpt} not found: no epoch of a {model} run has ended in {repo} yet")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    rows = state["history"]
    run = newest_stage_run(repo, model)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    entry = run_entry(model, run) | {
        "status": "complete" if state["complete"] else "under way",
        "epochs": len(rows),
        "seconds": sum(row["epoch_seconds"] for row in rows),
    }
    if model in CLASSIFIERS:
        entry |= {
            "epochs_planned": params[model]["epochs"],
            "train_images": int(run["params"]["train_images"]),
            "precision": run["params"]["precision_resolved"],
            "test_acc": rows[-1]["test_acc"],
            "history": rows,
        }
    else:  # the final FID / IS come when the run ends; the curve measured during training so far
        entry |= {
            "epochs_planned": params["gan"]["epochs"],
            "train_images": int(round(params["gan"]["train_fraction"] * 60_000)),
            "precision": "fp32",  # the GAN loop has no autocast
            "history": [
                {k: row[k] for k in ("epoch", "d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds")} for row in rows
            ],
            "fid_curve": [{"epoch": row["epoch"], "fid": row["fid_during"]} for row in rows if "fid_during" in row],
            "fid_curve_n": int(run["params"]["fid_samples_during"]),
        }
    return save(model, entry)


def stopped(model: str, why: str) -> dict:
    """Mark `model`'s run under way as stopped for good, keeping the epochs it reached and why."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry = results.get(model)
    if entry is None or entry.get("status") != "under way":
        raise SystemExit(f"no {model} run under way in {RESULTS}: only a run recorded with `progress` can be stopped")
    return save(model, entry | {"status": "stopped", "stopped_why": why})


def table() -> str:
    """The report's tables of these runs (reprovision.publish.report builds them), as Markdown for BENCHMARKS.md:
    the runs, then their epochs beside the figures the sources printed for the same epochs."""
    from reprovision.publish.report import md_cell
    from reprovision.publish.report_tables import reference_scale_epochs, reference_scale_table

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    tables = [t for t in (reference_scale_table(results), reference_scale_epochs(results)) if t is not None]
    if not tables:
        return "(no reference-scale run recorded yet)"
    return "\n\n".join(
        "\n".join(
            ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
            + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in t["rows"]]
        )
        for t in tables
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--repo", type=Path, required=True, help="the clone the run happened in")
    rec.add_argument("--model", required=True, choices=[*CLASSIFIERS, *GANS])
    prog = sub.add_parser("progress", help="a run still under way: its epochs so far")
    prog.add_argument("--repo", type=Path, required=True, help="the clone the run happens in")
    prog.add_argument("--model", required=True, choices=[*CLASSIFIERS, *GANS])
    stop = sub.add_parser("stopped", help="a run under way that can no longer resume: keep its epochs, marked stopped")
    stop.add_argument("--model", required=True, choices=[*CLASSIFIERS, *GANS])
    stop.add_argument("--why", required=True, help="why it cannot resume, e.g. its machine is gone")
    seed = sub.add_parser("record-seed", help="one seed of a repeated classifier run, under its architecture")
    seed.add_argument("--repo", type=Path, required=True, help="the clone the run happened in")
    seed.add_argument("--model", required=True, choices=CLASSIFIERS)
    seed.add_argument("--exp-seconds", type=float, required=True, help="the whole `dvc exp run`, wall clock")
    seed.add_argument("--note", default="", help="what a reader must know of this run, e.g. what slowed it")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "table":
        print(table())
        return
    if args.command == "stopped":
        entry = stopped(args.model, args.why)
    elif args.command == "record-seed":
        entry = record_seed(args.repo.resolve(), args.model, args.exp_seconds, args.note)
        entry = {**entry, "runs": [{k: v for k, v in r.items() if k != "history"} for r in entry["runs"]]}
    else:
        entry = (record if args.command == "record" else progress)(args.repo.resolve(), args.model)
    print(json.dumps({k: v for k, v in entry.items() if k not in ("history", "fid_curve", "earlier_runs")}, indent=2))


if __name__ == "__main__":
    main()
