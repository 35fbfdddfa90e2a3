"""The report stage: a fake results tree in, a self-contained page out, checked in a real browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from markupsafe import escape
from PIL import Image

from reprovision.publish import registry, report, report_charts, report_tables

CHROMIUM = Path("/usr/bin/chromium")
RUN_IDS = {"vit": "a" * 32, "cnn": "b" * 32, "mlp": "c" * 32, "dcgan": "d" * 32, "judge": "e" * 32}
# A CPU-sized configuration: the page must say it is reduced.
PARAMS = {
    "data": {"train_fraction": 0.1},
    "vit": {"epochs": 3},
    "cnn": {"epochs": 3},
    "gan": {"epochs": 3, "fid_samples": 500},
}
EVALUATION_FIGURES = [name for row in report.EVALUATION_FIGURES for name, _ in row]


# ---------------------------------------------------------------------------- a fake results tree
def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed).save(path)


def write_predictions(root: Path, table: dict[tuple[bool, bool], int]) -> None:
    """metrics/eval/{vit,cnn}_confusion.json with `table[(vit right, cnn right)]` images of each kind."""
    records: dict[str, list[dict]] = {"vit": [], "cnn": []}
    for (vit_right, cnn_right), images in table.items():
        for i in range(images):
            actual = ("cat", "dog", "ship")[i % 3]
            for model, right in (("vit", vit_right), ("cnn", cnn_right)):
                records[model].append({"actual": actual, "predicted": actual if right else "frog"})
    for model, rows in records.items():
        write_json(root / f"metrics/eval/{model}_confusion.json", rows)


def write_results(root: Path, classifiers: bool = True, gans: bool = True, ssl: bool = True) -> None:
    """What the earlier stages leave behind, with plausible values."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    write_json(
        root / "data/prepared/manifest.json",
        {
            "cifar10": {"train": 50000, "test": 10000, "sha256": "1" * 64, "files": {"train_x.npy": "2" * 64}},
            "mnist": {"train": 60000, "test": 10000, "sha256": "3" * 64, "files": {"train_x.npy": "4" * 64}},
        },
    )
    uris = {"vit": "sqlite:////tmp/store/mlflow.db", "cnn": "http://mlflow.example:5000"}
    if classifiers:
        # The training stage's test figure (monitoring, in bf16) is an image or so away from evaluate's (fp32).
        for m, acc, monitored, seconds in (("vit", 0.4172, 0.4177, 31.0), ("cnn", 0.5861, 0.5856, 18.5)):
            write_json(
                root / f"metrics/{m}/summary.json",
                {
                    "monitor_test_acc": monitored,
                    "monitor_test_loss": 1.61,
                    "train_acc": acc - 0.03,
                    "train_loss": 1.7,
                    "params": report.REFERENCE[m]["params"],
                    "epochs": 3,
                    "train_seconds": 3 * seconds,
                    "s_per_epoch": seconds,
                    "test_images": 1000,
                    "device": "cpu",
                },
            )
            write_csv(
                root / f"metrics/{m}/history.csv",
                [
                    {
                        "epoch": e,
                        "train_loss": 2.2 - 0.2 * e,
                        "train_acc": acc * e / 3 - 0.03,
                        "test_loss": 2.1 - 0.17 * e,
                        "test_acc": acc * e / 3,
                        "epoch_seconds": seconds + e,
                        "lr": 1e-3,
                    }
                    for e in (1, 2, 3)
                ],
            )
            write_json(
                root / f"models/{m}/run.json",
                {"run_id": RUN_IDS[m], "experiment_id": "1", "tracking_uri": uris[m], "run_name": f"train-{m}"},
            )
            (root / f"models/{m}/card.md").write_text(
                f"# Model card: {m}\n\n**Architecture.** a {m}.\n\n| metric | value |\n|---|---|\n| "
                f"monitor_test_acc | {monitored} |\n"
            )
        write_json(
            root / "metrics/eval/summary.json",
            {
                "classifiers": {
                    "vit": {
                        "accuracy": 0.4172,
                        "macro_precision": 0.41,
                        "macro_recall": 0.4168,
                        "macro_f1": 0.4031,
                        "per_class": {},
                    },
                    "cnn": {
                        "accuracy": 0.5861,
                        "macro_precision": 0.59,
                        "macro_recall": 0.5849,
                        "macro_f1": 0.5790,
                        "per_class": {},
                    },
                },
                "gans": {},
            },
        )
        for seed, name in enumerate(EVALUATION_FIGURES):
            write_png(root / "reports/figures" / name, seed)
        # Per test image, as the evaluate stage records it: 350 both get right, 67 only the ViT, 236 only the CNN.
        write_predictions(root, {(True, True): 350, (True, False): 67, (False, True): 236, (False, False): 347})
    if gans:
        write_json(root / "metrics/judge/summary.json", {"test_acc": 0.9871, "params": 44426, "epochs": 4})
        write_json(
            root / "models/judge/run.json",
            {"run_id": RUN_IDS["judge"], "experiment_id": "1", "tracking_uri": uris["vit"], "run_name": "train-judge"},
        )
        for seed, (g, fid) in enumerate((("mlp", 23.456), ("dcgan", 7.891)), start=20):
            write_json(
                root / f"metrics/gan/{g}/summary.json",
                {
                    "fid": fid,
                    "fid_floor": 0.812,
                    "inception_score": 8.73,
                    "inception_score_std": 0.11,
                    "inception_score_real": 9.61,
                    "kl_uniform": 0.0123,
                    "class_histogram": [48, 52, 50, 47, 55, 49, 51, 50, 46, 52],
                    "n": 500,
                    "d_loss": 0.61,
                    "g_loss": 0.93,
                    "epochs": 3,
                    "total_seconds": 42.0,
                    "s_per_epoch": 14.0,
                    "g_params": 1_496_592,
                    "d_params": 533_505,
                },
            )
            write_csv(
                root / f"metrics/gan/{g}/history.csv",
                [
                    {
                        "epoch": e,
                        "d_loss": 0.7 - 0.03 * e,
                        "g_loss": 0.8 + 0.05 * e,
                        "d_real": 0.6,
                        "d_fake": 0.4,
                        "epoch_seconds": 14.0,
                    }
                    for e in (1, 2, 3)
                ],
            )
            write_csv(root / f"metrics/gan/{g}/fid.csv", [{"epoch": e, "fid": fid * (4 - e)} for e in (1, 2, 3)])
            folder = root / "models/gan" / g
            for i, name in enumerate(
                ("grid_10x10.png", "nearest_neighbours.png", "samples/epoch_000.png", "samples/epoch_003.png")
            ):
                write_png(folder / name, seed * 10 + i)
            noise_image(seed).save(
                folder / "progression.gif", save_all=True, append_images=[noise_image(seed + 1)], duration=200, loop=0
            )
            write_json(
                folder / "run.json",
                {"run_id": RUN_IDS[g], "experiment_id": "1", "tracking_uri": uris["vit"], "run_name": f"train-gan-{g}"},
            )
    if ssl:
        write_json(
            root / "metrics/ssl/summary.json",
            {"loss": 5.28, "pair_acc": 0.14, "epochs": 4, "train_images": 2500, "arch": "resnet18"},
        )
        write_csv(
            root / "metrics/ssl/history.csv",
            [
                {"epoch": e, "loss": 5.6 - 0.1 * e, "pair_acc": 0.1, "epoch_seconds": 7.5, "lr": 1e-3}
                for e in (1, 2, 3, 4)
            ],
        )
        write_json(
            root / "metrics/probe/summary.json",
            {
                "probe_test": 0.4785,
                "knn_test": 0.4055,
                "random_probe_test": 0.4505,
                "random_knn_test": 0.37,
                "arch": "resnet18",
                "train_images": 5000,
            },
        )


def input_pictures(root: Path) -> list[Path]:
    gans = root / "models/gan"
    return sorted([*(root / "reports/figures").glob("*.png"), *gans.rglob("*.png"), *gans.rglob("*.gif")])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("results")
    write_results(root)
    return root, report.build_report(root)


def page(root: Path) -> tuple[str, str]:
    return (root / "reports/report.md").read_text(), (root / "reports/report.html").read_text()


# ---------------------------------------------------------------------------- content
def test_key_numbers_appear_as_on_the_page(built):
    root, numbers = built
    md, html = page(root)
    vit = json.loads((root / "metrics/eval/summary.json").read_text())["classifiers"]["vit"]
    vit["test_acc"] = vit["accuracy"]  # evaluate's: the test accuracy the page shows
    mlp = json.loads((root / "metrics/gan/mlp/summary.json").read_text())
    assert numbers["vit.test_acc"] == vit["test_acc"] and numbers["mlp.fid"] == mlp["fid"]
    assert {"cnn.test_acc", "dcgan.fid", "dcgan.inception_score", "judge.test_acc", "vit.macro_f1"} <= set(numbers)
    for text in (md, html):
        assert report_tables.pct(vit["test_acc"]) in text
        assert report_tables.fixed(mlp["fid"]) in text
        assert "5,362,762" in text  # R3's ViT parameter count, beside ours
        assert "~52–55%" in text  # R3's ViT test accuracy
        assert "0.347" in text and "0.728" in text  # R1 and R2 reported losses
    # The test set's own noise beside each test accuracy: 417 of 1,000 images, Wilson's 95 % interval.
    for text in (md, html):
        assert f"{report_tables.pct(vit['test_acc'])} [38.7–44.8]" in text and "1,000 test images alone" in text
    assert report_tables.test_noise(0.5, 10_000) == " [49.0–51.0]" and report_tables.test_noise(0.9, None) == ""
    # Sections in the order the brief asks for.
    heads = [
        html.index(f'id="{anchor}"')
        for anchor in ("summary", "comparison", "curves", "evaluation", "gans", "provenance")
    ]
    assert heads == sorted(heads)


def test_each_classifier_has_one_test_accuracy_evaluates(built, tmp_path):
    """The summary, R3's comparison, the SSL section and the evaluation table all give evaluate's test accuracy
    (the shipped weights in fp32, as served); the training stage's own figure, an image away in bf16, is none
    of them, and the curves call its per-epoch test figures monitoring. Without evaluate's record: no test accuracy."""
    root, numbers = built
    md, html = page(root)
    evaluation = json.loads((root / "metrics/eval/summary.json").read_text())["classifiers"]
    for m in ("vit", "cnn"):
        stage = json.loads((root / f"metrics/{m}/summary.json").read_text())
        accuracy = evaluation[m]["accuracy"]
        assert "test_acc" not in stage and report_tables.pct(stage["monitor_test_acc"]) != report_tables.pct(accuracy)
        assert numbers[f"{m}.test_acc"] == accuracy
        for text in (md, html):
            assert report_tables.pct(stage["monitor_test_acc"]) not in text
            # summary, R3's comparison and evaluation tables (and the CNN in the SSL table, as the supervised row)
            assert text.count(report_tables.pct(accuracy)) == (4 if m == "cnn" else 3), m
    assert "are monitoring under its precision" in md
    write_results(tmp_path, gans=False, ssl=False)
    (tmp_path / "metrics/eval/summary.json").unlink()
    assert "vit.test_acc" not in report.build_report(tmp_path)
    md, _ = page(tmp_path)
    assert "test acc —" in md and "41.77" not in md and "41.72" not in md


def test_two_classifiers_are_compared_by_mcnemar_on_the_same_images_not_by_their_intervals(built, tmp_path):
    md, html = page(built[0])
    line = (
        "ViT vs CNN on the same 1,000 test images: 67 right only by the ViT against 236 right only by the CNN, "
        "p < 0.001 (McNemar, exact)."
    )
    assert md.count(line) == 2 and html.count(f'<p class="paired">{escape(line)}</p>') == 2  # summary and evaluation
    for text in (md, html):
        assert "told apart" not in text and "two halves" not in text
    # b = 10, c = 2: the exact two-sided p is 2 x P(X <= 2 | 12, 1/2) = 158 / 4096.
    write_results(tmp_path, gans=False, ssl=False)
    write_predictions(tmp_path, {(True, True): 5, (True, False): 10, (False, True): 2, (False, False): 3})
    report.build_report(tmp_path)
    md, _ = page(tmp_path)
    assert "on the same 20 test images: 10 right only by the ViT against 2 right only by the CNN, p = 0.039" in md


def test_predictions_of_different_test_images_are_refused(tmp_path):
    write_results(tmp_path, gans=False, ssl=False)
    path = tmp_path / "metrics/eval/cnn_confusion.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records[1:] + records[:1]))  # another order: not the ViT's images
    with pytest.raises(report.ReportError, match=r"vit_confusion\.json and cnn_confusion\.json are not of the same"):
        report.build_report(tmp_path)
    path.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(report.ReportError, match=r"cnn_confusion\.json is not a list of \{actual, predicted\}"):
        report.build_report(tmp_path)


def test_reduced_configuration_is_flagged(built):
    md, html = page(built[0])
    assert '<span class="badge">reduced</span>' in html and "**reduced**" in md
    assert "train 10% · test 100% · 3/30 epochs" in html
    assert "train 100% · 4/4 epochs</td>" in html  # the judge ran its full configuration: no badge


def test_mlflow_links(built):
    md, html = page(built[0])
    assert f'href="http://mlflow.example:5000/#/experiments/1/runs/{RUN_IDS["cnn"]}"' in html
    assert RUN_IDS["vit"] in html and RUN_IDS["vit"] in md
    assert "mlflow ui --backend-store-uri sqlite:////tmp/store/mlflow.db" in html
    # ...and the page of the local store's training runs, not MLflow 3's GenAI overview.
    runs_page = "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
    assert f'href="{runs_page}"' in html and runs_page in md


def test_provenance(built):
    root, _ = built
    md, html = page(root)
    assert "1" * 64 in html and "3" * 64 in md  # data sha256
    assert "<details><summary>params.yaml</summary>" in html and "train_fraction: 0.1" in html
    for library in ("torch", "torchvision", "mlflow", "dvc", "numpy", "scikit-learn"):
        assert f"{library} <code>" in html
    assert "<h1>Model card: vit</h1>" in html  # the card is rendered, not dumped


def test_html_is_self_contained(built):
    root, _ = built
    _, html = page(root)
    assert not re.search(r"<link|<script[^>]+src|src=\"(https?:)?//|url\(|@import", html)
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == html.count("<img")
    for src in sources:
        header, payload = src.split(",", 1)
        assert re.fullmatch(r"data:image/(png|gif);base64", header)
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            image.verify()
    # Every picture of the earlier stages and every curve drawn here is on the page.
    curves = sorted((root / "reports/curves").glob("*.png"))
    assert len(curves) == 8  # 3 classifier curves, 2 GAN losses, FID, class histogram, SSL loss
    for path in [*input_pictures(root), *curves]:
        assert report.data_uri(path) in html, path


def test_markdown_links_resolve(built):
    root, _ = built
    md, _ = page(root)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all((root / "reports" / link).exists() for link in links)


def test_sections_without_their_inputs_say_so(tmp_path):
    gan_only, classifiers_only = tmp_path / "gan_only", tmp_path / "classifiers_only"
    write_results(gan_only, classifiers=False)
    write_results(classifiers_only, gans=False)
    (classifiers_only / "reports/figures/rollout_vit.png").unlink()
    numbers = report.build_report(gan_only)
    assert "mlp.fid" in numbers and "vit.test_acc" not in numbers
    md, html = page(gan_only)
    assert "Not run: <code>metrics/vit/summary.json</code> is missing" in html and 'id="comparison"' not in html
    assert "`metrics/cnn/summary.json` is missing" in md
    numbers = report.build_report(classifiers_only)
    assert "cnn.test_acc" in numbers and "dcgan.fid" not in numbers
    _, html = page(classifiers_only)
    assert "Not run: <code>metrics/gan/mlp/summary.json</code> is missing" in html and 'id="gans"' not in html
    assert "not shown: rollout_vit.png" in html


def test_the_champion_is_named_on_validation_accuracy_and_never_on_the_test_set(built, tmp_path):
    root, _ = built
    md, html = page(root)  # no validation split: the CNN's better test accuracy names nothing
    assert (
        f"**Champion:** {registry.NO_VALIDATION}" in md
        and f'<p id="champion"><strong>Champion:</strong> {registry.NO_VALIDATION}</p>' in html
    )
    assert "mlflow.pyfunc.load_model" not in md
    write_results(tmp_path)
    for model, val_acc in (("vit", 0.452), ("cnn", 0.447)):  # the ViT validates better, the CNN tests better
        path = tmp_path / f"metrics/{model}/summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "val_acc": val_acc}))
    report.build_report(tmp_path)
    md, _ = page(tmp_path)
    assert "**Champion:** ViT, by validation accuracy: ViT 45.20 % vs CNN 44.70 %." in md
    assert registry.NO_VALIDATION not in md


def test_bad_inputs_name_the_file(tmp_path):
    write_results(tmp_path, gans=False)
    (tmp_path / "metrics/vit/summary.json").write_text("{not json")
    with pytest.raises(report.ReportError, match=r"metrics/vit/summary\.json is not valid JSON"):
        report.build_report(tmp_path)
    write_results(tmp_path, gans=False)
    (tmp_path / "metrics/cnn/history.csv").write_text("epoch,loss\n1,2.0\n")
    with pytest.raises(report.ReportError, match=r"history\.csv lacks column\(s\) train_loss"):
        report.build_report(tmp_path)


def test_sample_frames_keep_first_and_last(tmp_path):
    for epoch in range(51):
        (tmp_path / f"epoch_{epoch:03d}.png").touch()
    frames = [int(p.stem.split("_")[1]) for p in report.sample_frames(tmp_path)]
    assert frames == [0, 10, 20, 30, 40, 50]


# ---------------------------------------------------------------------------- in a browser
def chromium(*args: str, profile: Path) -> str:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's `chromium` package (apt-get install chromium); CI installs it"
        )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    done = subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_renders_in_a_browser(built, tmp_path):
    root, _ = built
    url = (root / "reports/report.html").as_uri()
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", url, profile=tmp_path / "profile")
    images = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert images == page(root)[1].count("<img") > 0
    assert 'data-broken-images="0"' in dom
    vit = json.loads((root / "metrics/eval/summary.json").read_text())["classifiers"]["vit"]
    assert report_tables.pct(vit["accuracy"]) in dom

    screenshot = root / "reports/screenshots/report.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    chromium(
        f"--screenshot={screenshot}", "--window-size=1366,900", "--hide-scrollbars", url, profile=tmp_path / "profile"
    )
    with Image.open(screenshot) as image:
        assert image.size == (1366, 900)
        assert np.asarray(image.convert("L"), dtype=float).std() > 10  # not a blank page


# ---------------------------------------------------------------------------- MLflow
def test_log_summary_run(built, tmp_path, monkeypatch):
    import mlflow

    root, numbers = built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    run_id = report.log_summary_run(root, numbers)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.metrics == pytest.approx(numbers)
    assert run.data.tags["stage"] == "report"
    assert set(run.data.tags["linked_runs"].split(",")) == set(RUN_IDS.values())
    assert run.data.params["data.train_fraction"] == "0.1"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "report.md", "curves"} <= artifacts
    html = Path(client.download_artifacts(run_id, "report.html", str(tmp_path))).read_text()
    assert html == page(root)[1]


def test_log_summary_run_needs_the_report(tmp_path):
    with pytest.raises(report.ReportError, match="call build_report"):
        report.log_summary_run(tmp_path, {})


def test_reference_scale_runs_are_shown_beside_the_seeds_figures():
    results = {
        "vit": {
            "epochs": 5,
            "epochs_planned": 30,
            "train_images": 50_000,
            "precision": "fp32",
            "threads": 2,
            "test_acc": 0.4812,
            "seconds": 5400.0,
            "git_commit": "a" * 40,
            "history": [],
        },
        "mlp": {
            "epochs": 50,
            "train_images": 60_000,
            "precision": "fp32",
            "threads": 1,
            "fid": 12.345,
            "fid_floor": 0.8,
            "inception_score": 8.9,
            "seconds": 1800.0,
            "git_commit": "b" * 40,
            "history": [{"d_loss": 1.25, "g_loss": 0.9}],
        },
    }
    built = report_tables.reference_scale_table(results)
    vit, mlp = (dict(zip(built["header"], row)) for row in built["rows"])
    assert (
        vit["Epochs"] == "5 of 30"
        and vit["Result"]["text"] == "test acc 48.12%"
        and vit["Result"]["ref"] == "R3: ~52–55%"
    )
    assert mlp["Epochs"] == "50" and "FID 12.35 (floor 0.80), IS 8.90; D 1.250 / G 0.900" == mlp["Result"]["text"]
    assert mlp["Result"]["ref"].startswith("R1: D 0.347 / G 0.697") and mlp["Training time"] == "30 min"
    assert report_tables.reference_scale_table({}) is None
    # A run still under way (reference_scale.py progress) has been paused and resumed: no training time.
    results["vit"]["status"] = "under way"
    vit = dict(zip(built["header"], report_tables.reference_scale_table(results)["rows"][0]))
    assert vit["Epochs"] == "5 of 30" and vit["Training time"] == "under way"
    # One that can no longer resume (reference_scale.py stopped) keeps its epochs, marked stopped.
    results["vit"]["status"] = "stopped"
    vit = dict(zip(built["header"], report_tables.reference_scale_table(results)["rows"][0]))
    assert (
        vit["Epochs"] == "5 of 30" and vit["Training time"] == "stopped" and vit["Result"]["text"] == "test acc 48.12%"
    )
    # A new run that replaced the stopped one (reference_scale.py progress) is shown above it.
    results["vit"] = {
        **results["vit"],
        "status": "under way",
        "epochs": 1,
        "test_acc": 0.3482,
        "git_commit": "d" * 40,
        "earlier_runs": [results["vit"]],
    }
    new, earlier = (dict(zip(built["header"], row)) for row in report_tables.reference_scale_table(results)["rows"][:2])
    assert (new["Model"], new["Epochs"], new["Result"]["text"], new["Training time"]) == (
        "ViT",
        "1 of 30",
        "test acc 34.82%",
        "under way",
    )
    assert (earlier["Model"], earlier["Epochs"], earlier["Training time"]) == (
        "ViT (earlier run)",
        "5 of 30",
        "stopped",
    )
    assert earlier["Commit"]["text"] == "a" * 12
    # A GAN under way has no final FID yet: the latest point of its curve, said to be one.
    results = {
        "dcgan": {
            "status": "under way",
            "epochs": 5,
            "epochs_planned": 50,
            "train_images": 60_000,
            "precision": "fp32",
            "threads": 1,
            "seconds": 3000.0,
            "git_commit": "c" * 40,
            "fid_curve_n": 2000,
            "history": [{"d_loss": 1.1, "g_loss": 0.95}],
            "fid_curve": [{"epoch": 5, "fid": 7.891}],
        }
    }
    dcgan = dict(zip(built["header"], report_tables.reference_scale_table(results)["rows"][0]))
    assert dcgan["Epochs"] == "5 of 50" and dcgan["Training time"] == "under way"
    assert dcgan["Result"]["text"] == "FID 7.89 at epoch 5 (N = 2,000, during training); D 1.100 / G 0.950"


def test_the_fast_cnn_is_shown_beside_r3s_models_with_its_seeds_spread_and_time():
    run = {
        "epochs": 10,
        "train_images": 50_000,
        "precision": "bf16",
        "threads": 2,
        "git_commit": "c" * 40,
        "family": "cnn",
    }
    results = {
        "cnn": {**run, "epochs": 30, "precision": "fp32", "test_acc": 0.9132, "seconds": 24717.0, "history": []},
        "airbench94": {
            "model": "airbench94",
            "runs": [{**run, "seed": 0, "test_acc": 0.9405}, {**run, "seed": 1, "test_acc": 0.9391}],
            "test_acc_mean": 0.9398,
            "test_acc_min": 0.9391,
            "test_acc_max": 0.9405,
            "test_acc_std": 0.00099,
            "seconds_median": 1010.0,
            "seconds_max": 1130.0,
        },
    }
    built = report_tables.reference_scale_table(results)
    cnn, fast = (dict(zip(built["header"], row)) for row in built["rows"])
    assert cnn["Result"]["text"] == "test acc 91.32%" and fast["Model"] == "airbench94 as the CNN (2 seeds)"
    assert fast["Result"]["text"] == "test acc 93.98% mean (min 93.91%, max 94.05%, std 0.10 points), with TTA"
    assert fast["Result"]["ref"] == "KellerJordan/cifar10-airbench: 94.01%, mean of 1,000 runs"
    assert (fast["Epochs"], fast["Precision"], fast["Training time"]) == (
        "10",
        "bf16",
        "16.8 min per seed (median; at most 18.8)",
    )


def test_reference_scale_epochs_are_shown_beside_the_figures_the_sources_printed_for_them():
    results = {
        "vit": {"history": [{"epoch": e, "train_acc": a} for e, a in ((1, 0.2871), (2, 0.4012), (6, 0.55))]},
        "cnn": {"history": [{"epoch": 1, "train_acc": 0.47}]},  # R3 printed no CNN epoch
        "dcgan": {"history": [{"epoch": e, "d_loss": 1.0408, "g_loss": 1.4339} for e in (1, 2)]},
    }
    built = report_tables.reference_scale_epochs(results)
    rows = [(model, epoch, result["text"], result["ref"]) for model, epoch, result in built["rows"]]
    assert rows == [
        ("ViT", "1", "train acc 28.71%", "R3: 29.39%"),
        ("ViT", "2", "train acc 40.12%", "R3: 38.79%"),
        ("DCGAN", "1", "D 1.041 / G 1.434", "R2: D 0.204 / G 1.833"),
    ]
    # A stopped run that a new one replaced keeps its rows, after the new run's.
    results["vit"] = {"history": [{"epoch": 1, "train_acc": 0.2911}], "earlier_runs": [results["vit"]]}
    rows = [
        (model, epoch, result["text"]) for model, epoch, result in report_tables.reference_scale_epochs(results)["rows"]
    ]
    assert rows[:3] == [
        ("ViT", "1", "train acc 29.11%"),
        ("ViT (earlier run)", "1", "train acc 28.71%"),
        ("ViT (earlier run)", "2", "train acc 40.12%"),
    ]
    assert report_tables.reference_scale_epochs({"cnn": results["cnn"]}) is None


def test_a_single_epoch_is_drawn_on_whole_epochs(tmp_path):
    axes = []
    report_charts._figure(tmp_path / "one.png", lambda ax: axes.append(ax) or ax.plot([1], [0.5], marker="o"))
    assert list(axes[0].get_xticks()) == [0, 1, 2]  # not 0.95, 0.96, ... around the one point


def test_reference_scale_runs_are_drawn_epoch_by_epoch(tmp_path):
    root = tmp_path / "results"
    write_results(root, gans=False, ssl=False)
    cnn = [{"epoch": e, "train_acc": 0.4 + e / 20, "test_acc": 0.5 + e / 20, "epoch_seconds": 480.0} for e in (1, 2, 3)]
    mlp = {
        "epochs": 50,
        "train_images": 60_000,
        "precision": "fp32",
        "threads": 1,
        "fid": 52.9,
        "fid_floor": 2.3,
        "inception_score": 7.9,
        "seconds": 2760.0,
        "git_commit": "b" * 40,
        "history": [{"epoch": 50, "d_loss": 1.38, "g_loss": 0.72}],
        "fid_curve": [{"epoch": 5, "fid": 257.3}, {"epoch": 10, "fid": 157.6}],
        "grid": "benchmarks/reference_scale/mlp_grid_10x10.png",
    }
    write_png(root / mlp["grid"], seed=7)  # reference_scale.py record keeps it there
    write_json(
        root / "benchmarks/reference_scale.json",
        {
            "cnn": {
                "status": "under way",
                "epochs": 3,
                "epochs_planned": 30,
                "train_images": 50_000,
                "precision": "fp32",
                "threads": 2,
                "test_acc": 0.65,
                "git_commit": "a" * 40,
                "history": cnn,
                "earlier_runs": [
                    {
                        "status": "stopped",
                        "epochs": 1,
                        "epochs_planned": 30,
                        "train_images": 50_000,
                        "precision": "fp32",
                        "threads": 1,
                        "test_acc": 0.56,
                        "git_commit": "c" * 40,
                        "history": cnn[:1],
                    }
                ],
            },
            "mlp": mlp,
        },
    )
    report.build_report(root)
    md, html = page(root)
    for name, caption in (
        ("reference_scale_accuracy.png", "Reference-scale runs: accuracy per epoch"),
        ("reference_scale_fid.png", "Reference-scale GAN runs: FID during training"),
    ):
        assert Image.open(root / "reports/curves" / name).size[0] > 300
        assert f"![{caption}](curves/{name})" in md and f'alt="{caption}"' in html
    assert (
        md.index("## Reference-scale runs")
        < md.index("curves/reference_scale_accuracy.png")
        < md.index("## ViT vs CNN")
    )
    assert '<a href="#reference-scale">' in html and "CNN (earlier run)" in md
    # The finished GAN run's 10x10 grid, linked from reports/ in the markdown, pixel-sharp in the HTML.
    grid = "MLP GAN at reference scale: 100 samples after 50 epochs"
    assert f"![{grid}](../benchmarks/reference_scale/mlp_grid_10x10.png)" in md
    assert re.search(rf'<figure class="pixels"><img src="data:image/png;base64,[^"]+" alt="{grid}">', html)
    # Without per-epoch rows or a FID curve there is nothing to draw.
    assert report_charts.reference_scale_curves({"mlp": mlp | {"fid_curve": []}}, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()
    # A grid the JSON names but the checkout lacks is said on the page, not left out in silence.
    (root / mlp["grid"]).unlink()
    report.build_report(root)
    md, html = page(root)
    missing = "benchmarks/reference_scale/mlp_grid_10x10.png is missing: no MLP GAN grid"
    assert missing in md and missing in html and f"![{grid}]" not in md and f'alt="{grid}"' not in html


def test_ssl_section_puts_the_probe_beside_the_floor_and_the_supervised_cnn(built, tmp_path):
    root, numbers = built
    md, html = page(root)
    assert numbers["ssl.probe_test"] == 0.4785 and numbers["ssl.random_probe_test"] == 0.4505
    for text in (md, html):
        assert "Self-supervised pre-training (R4)" in text
        assert "47.85%" in text and "45.05%" in text and "40.55%" in text  # probe, random floor, k-NN
        assert "58.61%" in text  # the supervised CNN's test accuracy, in the same table
        assert "a different architecture" in text  # params: ssl.arch resnet18, cnn.arch refcnn
    assert (root / "reports/curves/ssl_loss.png").exists()
    assert not (root / "reports/curves/ssl_size.png").exists()  # no size study recorded in this tree
    # Without the SSL stages' outputs there is no section (and nothing else changes).
    write_results(tmp_path, ssl=False)
    report.build_report(tmp_path)
    md, html = page(tmp_path)
    assert "Self-supervised" not in md and 'id="ssl"' not in html


def test_a_recorded_ssl_size_study_is_plotted_in_the_ssl_section(tmp_path):
    write_results(tmp_path)
    rows = [
        {"ssl_train_images": n, "probe_test": p, "knn_test": p - 0.05, "random_probe_test": 0.45}
        for n, p in ((5_000, 0.55), (25_000, 0.66), (50_000, 0.71))
    ]
    write_json(tmp_path / "benchmarks/ssl_size_study.json", {"runs": rows})
    report.build_report(tmp_path)
    md, html = page(tmp_path)
    assert "Pre-training-set-size study: 3 runs recorded in benchmarks/ssl_size_study.json" in md
    assert report.data_uri(tmp_path / "reports/curves/ssl_size.png") in html
