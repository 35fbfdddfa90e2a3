"""The DAG's first run again, in a second clone with a cache of its own: bit for bit the same as
test_pipeline_e2e.py's. Then, on that clone, what a change marks or re-runs: GAN and SSL params, the
thread count, a code file, a rejected param.

The tests run in order on one copy of the repository and build on each other's results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY, _new_copy, dvc, exp_run, pipeline_env, sh
from imports import closure
from pipeline import ALL_STAGES, agree_with_the_other_clone, fingerprints, outputs_sha256, stages_run, training_runs

from reprovision.core.runtime import cpu_kernels

pytestmark = pytest.mark.slow
FIRST_RUN: dict[str, str] = {}


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory, stage_mirror) -> Path:
    """A DVC cache of its own (not the session's shared one): these tests count what runs and what
    comes back from the run-cache, starting from nothing."""
    return _new_copy(tmp_path_factory.mktemp("repo"))


def test_second_clone_reproduces_bit_for_bit(module_repo, tmp_path_factory):
    """Same params, data and code in a separate clone: identical metrics files and model weights.
    Whichever of the two first runs finishes second compares (see pipeline.agree_with_the_other_clone)."""
    first = exp_run(module_repo)
    assert stages_run(first.stdout) == ALL_STAGES, first.stdout
    FIRST_RUN.update(fingerprints(module_repo))
    agree_with_the_other_clone(FIRST_RUN, tmp_path_factory)


def test_gan_and_ssl_params_mark_only_their_stages(module_repo):
    """Which stages each param alone marks (`dvc status`: the stages whose own deps changed; the ones
    downstream of them, linear-probe after pretrain-ssl, follow when their outputs change). That DVC
    then runs exactly what it marks, and brings earlier params back from the run-cache bit for bit,
    test_pipeline_e2e.py checks for real with `-S lr=...`: running these two stages as well cost
    ~50 s of the suite's CPU (measured), for DVC behaviour that test already exercises."""
    params = module_repo / "params.yaml"
    text = params.read_text()
    try:
        for old, new, stage in (
            ("    lr_g: 0.0001\n", "    lr_g: 0.0002\n", "train-gan@mlp"),
            ("  temperature: 0.5\n", "  temperature: 0.2\n", "pretrain-ssl"),
        ):
            assert text.count(old) == 1, old
            params.write_text(text.replace(old, new))
            status = json.loads(dvc(module_repo, "status", "--json").stdout)
            assert set(status) == {"check-params", stage, "report"}, (new, status)  # the two read all of params.yaml
    finally:
        params.write_text(text)
    assert dvc(module_repo, "status", "--json").stdout.strip() in ("{}", "")


def test_threads_are_part_of_the_configuration(module_repo):
    """Another thread count is another configuration: DVC re-runs what computes, MLflow records it."""
    params = module_repo / "params.yaml"
    text = params.read_text()
    assert "\nthreads: 1\n" in text  # TINY's
    params.write_text(text.replace("\nthreads: 1\n", "\nthreads: 2\n"))
    status = json.loads(dvc(module_repo, "status", "--json").stdout)
    computing = {
        "train-judge",
        "train-gan@mlp",
        "train-gan@dcgan",
        "train-vit",
        "train-cnn",
        "evaluate",
        "pretrain-ssl",
        "linear-probe",
    }
    assert set(status) == computing | {"check-params", "report"}  # the last two read all of params.yaml
    params.write_text(text)
    sets = [arg for s in [*TINY, "threads=2"] for arg in ("-S", s)]
    two = dvc(module_repo, "exp", "run", *sets, "train-cnn", env=pipeline_env(OMP_NUM_THREADS="1"))
    assert stages_run(two.stdout) == {"check-params", "train-cnn"}, two.stdout
    assert "[train-cnn] device cpu, 2 thread(s)" in two.stdout  # params win over the environment
    newest = max(
        (r for r in training_runs(module_repo) if r.data.tags["stage"] == "train-cnn"), key=lambda r: r.info.start_time
    )
    assert newest.data.params["threads"] == "2" and newest.data.tags["threads"] == "2"
    assert newest.data.tags["cpu_kernels"] == cpu_kernels()  # the other knob of float sums
    # Back to 1 thread (only train-cnn changed, so only it is asked for: the others' DVC checks cost ~10 s).
    back = dvc(module_repo, "exp", "run", *[arg for s in TINY for arg in ("-S", s)], "train-cnn")
    assert stages_run(back.stdout) == {"check-params"} and fingerprints(module_repo) == FIRST_RUN


def test_editing_a_library_file_marks_exactly_its_stages(module_repo):
    """Append a comment to one code file at a time: `dvc status` names exactly the stages that import it.

    One file for each distinct set of stages (and one that no stage imports): each kind of deps list
    DVC must honour is exercised for real, at ~1.3 s of `dvc status` per file; tests/test_stage_deps.py
    checks every file's place in every stage's deps statically."""
    import yaml

    stages = yaml.safe_load((module_repo / "dvc.yaml").read_text())["stages"]
    script = lambda stage: next(w for w in stage["cmd"].split() if w.endswith(".py"))
    expected: dict[str, set[str]] = {}
    for name, stage in stages.items():
        addresses = [f"{name}@{m}" for m in stage["matrix"]["model"]] if "matrix" in stage else [name]
        for path in closure(module_repo / script(stage), module_repo):
            expected.setdefault(str(path.relative_to(module_repo.resolve())), set()).update(addresses)
    code = sorted(
        str(p.relative_to(module_repo)) for folder in ("src", "stages") for p in (module_repo / folder).rglob("*.py")
    )
    assert set(expected) <= set(code)
    representatives: dict[frozenset, str] = {}
    for name in code:
        representatives.setdefault(frozenset(expected.get(name, ())), name)
    code = sorted(representatives.values())
    assert len(code) >= 20  # today 22 sets (of 49 files): each stage's own files, the shared ones, the CLI tools
    # One process for all the files: `dvc status` through DVC's API, each file touched and restored.
    probe = f"""
import json, os
from pathlib import Path
from dvc.repo import Repo
found = {{}}
for name in {code!r}:
    path = Path(name)
    text, times = path.read_bytes(), (path.stat().st_atime_ns, path.stat().st_mtime_ns)
    path.write_bytes(text + b"\\n# touched\\n")
    with Repo() as repo:
        found[name] = sorted(repo.status())
    path.write_bytes(text)
    os.utime(path, ns=times)
print(json.dumps(found))
"""
    found = json.loads(sh([sys.executable, "-c", probe], module_repo, pipeline_env()).stdout.splitlines()[-1])
    for name in code:
        assert set(found[name]) == expected.get(name, set()), (
            f"editing {name} marks {found[name]}, expected {sorted(expected.get(name, ()))}"
        )
    assert dvc(module_repo, "status", "--json").stdout.strip() in ("{}", "")


# One bad value, one impossible device and one dataset that can't be had offline (CIFAR-100: in no mirror,
# never prepared here; with enough training images that its 100 classes each get a validation image) through
# `dvc exp run`; test_config and test_data check every message.
@pytest.mark.parametrize(
    "override, message",
    [
        ("vit.heads=0", "vit.heads = 0: Input should be greater than 0"),
        ("device=cuda", "device = 'cuda', but no cuda device is available"),
        (
            "data.classifier_dataset=cifar100 data.train_fraction=0.02",
            "data.classifier_dataset = cifar100 is in neither data/prepared/cifar100 (no prepared copy) nor the "
            "data mirror",
        ),
    ],
)
def test_a_rejected_param_leaves_the_workspace_whole(module_repo, override, message):
    outputs, text = outputs_sha256(module_repo), (module_repo / "params.yaml").read_text()
    failed = exp_run(module_repo, *override.split(), env=pipeline_env(CUDA_VISIBLE_DEVICES=""), check=False)
    assert failed.returncode != 0 and message in failed.stderr + failed.stdout
    assert stages_run(failed.stdout) == {"check-params"}, failed.stdout  # stopped before any other stage
    assert "Traceback" not in failed.stderr + failed.stdout
    assert outputs_sha256(module_repo) == outputs  # nothing deleted, nothing rewritten
    (module_repo / "params.yaml").write_text(text)  # DVC leaves the value the user set; put ours back


def test_airbench94_and_the_hybrid_vit_through_the_dag_with_test_time_augmentation_where_the_model_serves(module_repo):
    """Issue 35: a tiny `-S cnn.arch=airbench94` run through the real DAG, with its recipe's cnn params:
    only the classifiers and what reads them re-run; evaluate and the logged (served) model compute the recipe's
    test-time augmentation, whose figure the stage records beside the un-augmented one. In the same run (one DAG
    run for both fast recipes), issue 43's `-S vit.arch=hybrid` with the vit-hybrid recipe's vit params: the card
    splits the tokenizer's and the transformer's cost, the run records the CPU's math attention kernel, and
    evaluate rolls the attention out over the hybrid's tokens."""
    import mlflow
    import numpy as np
    import yaml

    from reprovision.data.datasets import load_split, stratified_subset

    sys.path.insert(0, str(module_repo / "benchmarks"))
    from recipes import AIRBENCH94, VIT_HYBRID, hydra_value

    recipe = [f"{k}={hydra_value(v)}" for k, v in AIRBENCH94.overrides.items() if k.startswith("cnn.")]
    recipe += ["cnn.epochs=2", "cnn.batch_size=64", "cnn.ema_decay=0.9"]  # TINY's size; an EMA scored beside
    recipe += [f"{k}={hydra_value(v)}" for k, v in VIT_HYBRID.overrides.items() if k.startswith("vit.")]
    recipe += ["vit.epochs=2", "vit.batch_size=64", "vit.tokenizer_widths=[8,16]", "vit.embed_dim=32", "vit.depth=1"]
    text = (module_repo / "params.yaml").read_text()
    run = exp_run(module_repo, *recipe, "vit.heads=2")
    ran = stages_run(run.stdout)
    assert {"train-cnn", "train-vit", "evaluate", "report"} <= ran and not ran & {"augment", "train-gan@dcgan"}
    card = (module_repo / "models/vit/card.md").read_text()
    assert "Hybrid ViT" in card and "MFLOPs per 32x32 image; transformer:" in card
    vit_run = max(
        (r for r in training_runs(module_repo) if r.data.tags["stage"] == "train-vit"), key=lambda r: r.info.start_time
    )
    assert vit_run.data.params["arch"] == "hybrid" and vit_run.data.params["attention_kernel"] == "math"
    assert (module_repo / "reports/figures/rollout_vit.png").stat().st_size > 0
    summary = json.loads((module_repo / "metrics/cnn/summary.json").read_text())
    assert summary["tta"] == "mirror_translate" and summary["tta_seconds"] > 0
    # The best epoch ships with its un-augmented figure beside, or the EMA if it validates better (issue 36).
    ema_shipped = summary["shipped_why"].startswith("the weights' moving average")
    assert ema_shipped or 0 <= summary["monitor_test_acc_plain"] <= 1
    newest = max(
        (r for r in training_runs(module_repo) if r.data.tags["stage"] == "train-cnn"), key=lambda r: r.info.start_time
    )
    assert newest.data.params["arch"] == "airbench94" and newest.data.params["tta"] == "mirror_translate"
    assert newest.data.metrics["monitor_tta_test_acc"] == summary["monitor_test_acc"]
    evaluated_summary = json.loads((module_repo / "metrics/eval/summary.json").read_text())["classifiers"]["cnn"]
    assert 0 <= summary["monitor_ema_test_acc"] <= 1 and 0 <= evaluated_summary["ema_accuracy"] <= 1
    assert (module_repo / "models/cnn/model_ema.pt").exists()

    params = yaml.safe_load((module_repo / "params.yaml").read_text())
    test = load_split(module_repo / "data/prepared", "cifar10", "test")
    images = test.x[stratified_subset(test.y, params["data"]["test_fraction"], params["seed"])]
    records = json.loads((module_repo / "metrics/eval/cnn_confusion.json").read_text())
    evaluated = [test.classes.index(r["predicted"]) for r in records]
    mlflow.set_tracking_uri(f"sqlite:///{module_repo / 'mlflow.db'}")
    try:
        uri = json.loads((module_repo / "models/cnn/run.json").read_text())["model_uri"]
        probabilities = mlflow.pyfunc.load_model(uri).predict(images)
    finally:
        mlflow.set_tracking_uri(None)
    assert images.dtype == np.uint8 and probabilities.argmax(axis=1).tolist() == evaluated  # they agree
    # ... on the augmented model: the stage's weights under the views, not the bare network.
    import torch

    from reprovision.config import Params
    from reprovision.data.augment import Policy, normalize
    from reprovision.models.cnn import FAMILY
    from reprovision.models.tta import for_inference

    cfg = Params(**params).cnn
    network = FAMILY.build(cfg, num_classes=10, channels=3, image_size=32)
    network.load_state_dict(torch.load(module_repo / "models/cnn/model.pt", weights_only=True))
    policy = Policy.from_json(json.loads((module_repo / "data/augment/policy.json").read_text()))
    x = normalize(torch.from_numpy(images), policy)
    with torch.no_grad():
        augmented = for_inference(network.eval(), cfg.tta)(x).softmax(1).numpy()
        bare = network(x).softmax(1).numpy()
    assert np.allclose(probabilities, augmented, atol=1e-4) and not np.allclose(probabilities, bare, atol=1e-4)
    (module_repo / "params.yaml").write_text(text)  # `dvc exp run -S` leaves its values in the workspace
    back = exp_run(module_repo)  # the params of the first run again: everything from the run-cache
    assert fingerprints(module_repo) == FIRST_RUN, back.stdout


def test_a_run_that_gets_worse_ships_registers_and_serves_its_best_validation_epoch(module_repo):
    """Issue 36: the CNN's lr multiplied by 1,000 after its third epoch (a step schedule) ruins its fourth.
    The stage ships the best validation epoch's weights: its summary's figures, and the version it registers
    and the server loads, whose test accuracy (fp32, as the CNN trains here) is that epoch's to the image."""
    import csv

    import mlflow
    import numpy as np
    import yaml

    from reprovision.data.datasets import load_split, stratified_subset

    text = (module_repo / "params.yaml").read_text()
    # 1,000 images (200 held out) and 200 test images: enough for three epochs to climb above chance.
    sizes = ["data.train_fraction=0.02", "data.test_fraction=0.02", "cnn.epochs=4", "cnn.batch_size=32"]
    worse = ["cnn.precision=fp32", "cnn.scheduler=step", "cnn.step_size=3", "cnn.gamma=1000"]
    dvc(module_repo, "exp", "run", *(arg for s in [*TINY, *sizes, *worse] for arg in ("-S", s)), "train-cnn")
    with open(module_repo / "metrics/cnn/history.csv") as f:
        history = list(csv.DictReader(f))
    val = [float(row["val_acc"]) for row in history]
    best = val.index(max(val)) + 1  # the first of equals
    summary = json.loads((module_repo / "metrics/cnn/summary.json").read_text())
    assert len(history) == 4 and best < 4 and val[3] < val[best - 1], history
    assert summary["shipped_epoch"] == summary["best_val_epoch"] == best
    best_test, last_test = float(history[best - 1]["test_acc"]), float(history[3]["test_acc"])
    assert summary["monitor_test_acc"] == best_test != last_test  # so the served model's figure tells the two apart

    params = yaml.safe_load((module_repo / "params.yaml").read_text())
    test = load_split(module_repo / "data/prepared", "cifar10", "test")
    chosen = stratified_subset(test.y, params["data"]["test_fraction"], params["seed"])
    run_id = json.loads((module_repo / "models/cnn/run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{module_repo / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        (version,) = [v for v in client.search_model_versions("name = 'reprovision-cnn'") if v.run_id == run_id]
        served = mlflow.pyfunc.load_model(f"models:/reprovision-cnn/{version.version}").predict(test.x[chosen])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(chosen) == 200 and np.mean(np.asarray(served).argmax(axis=1) == test.y[chosen]) == best_test
    (module_repo / "params.yaml").write_text(text)
    exp_run(module_repo)  # back to the first run's params: from the run-cache
    assert fingerprints(module_repo) == FIRST_RUN
