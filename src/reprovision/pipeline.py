"""What each DVC stage does, one function per stage; `stages/*.py` only call these.

Every function validates params (and the device, and the tracking store) before it reads data
or computes anything, and writes its outputs at the paths below, which `dvc.yaml` declares.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import cards, track
from .augment import BatchAugment, Policy, make_policy, preview_grid
from .config import DATASET_SHAPES, Params, load_params
from .data import data_sha256, fetch_all, load_split, mirror_from_env, stratified_subset
from .runtime import resolve_device, seed_everything

PREPARED = Path("data/prepared")
POLICY = Path("data/augment/policy.json")
PREVIEW = Path("data/augment/preview.png")
MODELS = Path("models")
METRICS = Path("metrics")
CHECKPOINTS = Path("checkpoints")
FIGURES = Path("reports/figures")
CLASSIFIERS = ("vit", "cnn")
GANS = ("mlp", "dcgan")


def code_digest() -> str:
    """sha256 of the library's source: a checkpoint from other code is never resumed."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _start(stage: str) -> tuple[Params, torch.device]:
    """Checks shared by every stage, all before any compute: params, device, tracking store."""
    params = load_params()
    device = resolve_device(params.device)
    track.check_store(track.tracking_uri())
    print(f"[{stage}] device {device}, params sha256 {params.digest()[:12]}", flush=True)
    return params, device


def load_subset(name: str, split: str, fraction: float, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    data = load_split(PREPARED, name, split)
    idx = stratified_subset(data.y, fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(data.x[idx])).to(device)
    y = torch.from_numpy(data.y[idx]).to(device)
    return x, y, data.classes


# ---------------------------------------------------------------------------- fetch-data
def fetch_data() -> None:
    params = load_params()
    mirror = mirror_from_env()
    names = sorted({params.data.gan_dataset, params.data.classifier_dataset})
    manifest = fetch_all(names, PREPARED, mirror)
    for name, entry in manifest.items():
        print(f"[fetch-data] {name}: {entry['train']} train / {entry['test']} test, sha256 {entry['sha256'][:12]} ({entry['source']})")


# ---------------------------------------------------------------------------- augment
def augment() -> None:
    params = load_params()
    ds = params.data.classifier_dataset
    train = load_split(PREPARED, ds, "train")
    idx = stratified_subset(train.y, params.data.train_fraction, params.seed)
    policy = make_policy(ds, params.augment, train.x[idx])
    write_json(POLICY, policy.to_json())
    rng = torch.Generator().manual_seed(params.seed)
    preview = torch.from_numpy(np.ascontiguousarray(train.x[idx[: params.augment.preview_images]]))
    preview_grid(preview, policy, PREVIEW, nrow=8, generator=rng)
    print(f"[augment] {ds}: mean {np.round(policy.mean, 4)} std {np.round(policy.std, 4)}; preview {PREVIEW}")


# ---------------------------------------------------------------------------- train-judge
def train_judge() -> None:
    from .gan_metrics import train_judge as fit_judge
    from .models import count_parameters

    params, device = _start("train-judge")
    rng = seed_everything(params.seed, device)
    cfg = params.judge
    train_x, train_y, _ = load_subset("mnist", "train", cfg.train_fraction, params.seed, device)
    test_x, test_y, _ = load_subset("mnist", "test", 1.0, params.seed, device)
    out = MODELS / "judge"
    run_params = {**cfg.model_dump(), "seed": params.seed, "dataset": "mnist"}
    with track.stage_run("train-judge", "judge", run_params, _tags(params, device, "mnist")) as run:
        judge, history = fit_judge(train_x, train_y, test_x, test_y, cfg, device, rng)
        for row in history:
            track.log_epoch(row, row["epoch"])
        final = history[-1]
        out.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), out / "model.pt")
        metrics = {"test_acc": final["test_acc"], "params": count_parameters(judge), "epochs": cfg.epochs, "device": str(device)}
        write_json(METRICS / "judge.json", metrics)
        card = cards.judge_card(params, metrics)
        (out / "card.md").write_text(card)
        track.log_torch_model(judge, "model", test_x[:4].float().div(127.5).sub(1).cpu(), card)
        track.write_run_ref(out / "run.json", run)
    print(f"[train-judge] test accuracy {final['test_acc']:.4f}")


def _tags(params: Params, device: torch.device, dataset: str) -> dict[str, str]:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params_sha256": params.digest(),
        "data_sha256": data_sha256(PREPARED, dataset),
        "dataset": dataset,
        "seed": str(params.seed),
    }


def load_judge(device: torch.device):
    from .models.judge import LeNet

    judge = LeNet()
    judge.load_state_dict(torch.load(MODELS / "judge" / "model.pt", map_location="cpu", weights_only=True))
    return judge.to(device).eval()


# ---------------------------------------------------------------------------- train-gan
def train_gan(name: str) -> None:
    from . import gan_metrics as gm
    from .gan_train import train_gan as fit_gan
    from .models import build_gan, count_parameters

    if name not in GANS:
        raise SystemExit(f"unknown GAN {name!r}; allowed: {', '.join(GANS)}")
    params, device = _start(f"train-gan {name}")
    rng = seed_everything(params.seed, device)
    gcfg = params.gan
    mcfg = getattr(gcfg, name)
    train_x, train_y, _ = load_subset("mnist", "train", gcfg.train_fraction, params.seed, device)
    test_x, _, _ = load_subset("mnist", "test", 1.0, params.seed, device)
    judge = load_judge(device)
    gen, disc = build_gan(name, params)
    gen, disc = gen.to(device), disc.to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=mcfg.lr_g, betas=(mcfg.beta1, mcfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=mcfg.lr_d, betas=(mcfg.beta1, mcfg.beta2))

    out = MODELS / "gan" / name
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    # A fixed noise batch, drawn from its own seeded generator, shows the same 100 digits evolving.
    noise_rng = torch.Generator(device=device).manual_seed(params.seed + 1)
    fixed_noise = torch.randn(100, mcfg.latent_dim, device=device, generator=noise_rng)
    real_test = gm.to_pm1(test_x)
    frames: list[Path] = []
    fid_curve: list[dict] = []

    def sample(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        gen.eval()
        with torch.no_grad():
            fakes = torch.cat([gen(torch.randn(min(1000, n - i), mcfg.latent_dim, device=device, generator=g)) for i in range(0, n, 1000)])
        gen.train()
        return fakes

    def snapshot(epoch: int) -> None:
        gen.eval()
        with torch.no_grad():
            grid = gen(fixed_noise)
        gen.train()
        path = samples / f"epoch_{epoch:03d}.png"
        gm.save_grid(grid, path, nrow=10)
        frames.append(path)

    history_rows: list[dict] = []

    def on_epoch(epoch: int, row: dict) -> None:
        if gcfg.fid_every and (epoch % gcfg.fid_every == 0 or epoch == gcfg.epochs):
            n = min(gcfg.fid_samples_during, len(real_test))
            # Its own name: the final "fid" uses gan.fid_samples images, and FID depends on N.
            row["fid_during"] = gm.frechet_distance(judge, real_test[:n], sample(n, params.seed + 2))
            fid_curve.append({"epoch": epoch, "fid": row["fid_during"]})
            print(f"          FID({n}) {row['fid_during']:.3f}", flush=True)
        if epoch % gcfg.sample_every == 0 or epoch == gcfg.epochs:
            snapshot(epoch)
        history_rows.append({k: row[k] for k in ("epoch", "d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds")})
        track.log_epoch(row, epoch)

    run_params = {
        **mcfg.model_dump(),
        **{k: v for k, v in gcfg.model_dump().items() if k not in GANS},
        "seed": params.seed,
        "dataset": "mnist",
        "model": name,
        "g_params": count_parameters(gen),
        "d_params": count_parameters(disc),
    }
    with track.stage_run("train-gan", f"gan-{name}", run_params, _tags(params, device, "mnist")) as run:
        snapshot(0)
        started = time.perf_counter()
        fit_gan(gen, disc, opt_g, opt_d, train_x, mcfg.latent_dim, mcfg.batch_size, gcfg.epochs, rng, on_epoch, gcfg.steps_per_epoch_max)
        total = time.perf_counter() - started

        n = min(gcfg.fid_samples, len(real_test))
        fakes = sample(n, params.seed + 3)
        real_train = gm.to_pm1(train_x)  # only now: no float copy of the train set held during training
        quality = gm.gan_quality(judge, fakes, real_test, real_train, n, torch.Generator(device=device).manual_seed(params.seed + 4))
        last = history_rows[-1]
        metrics = {
            **{k: v for k, v in quality.items() if k != "class_histogram"},
            "class_histogram": quality["class_histogram"],
            "d_loss": last["d_loss"],
            "g_loss": last["g_loss"],
            "epochs": gcfg.epochs,
            "total_seconds": total,
            "s_per_epoch": total / gcfg.epochs,
            "g_params": run_params["g_params"],
            "d_params": run_params["d_params"],
            "device": str(device),
        }
        write_json(METRICS / "gan" / f"{name}.json", metrics)
        write_csv(METRICS / "gan" / name / "history.csv", history_rows)
        write_csv(METRICS / "gan" / name / "fid.csv", fid_curve or [{"epoch": 0, "fid": float("nan")}])
        import mlflow

        per_epoch = {"d_loss", "g_loss"}  # logged with their step already
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in per_epoch}, step=gcfg.epochs)

        gm.save_grid(sample(100, params.seed + 5), out / "grid_10x10.png", nrow=10)
        gm.save_progression_gif(frames, out / "progression.gif")
        neighbours_of = sample(16, params.seed + 6)
        idx = gm.nearest_neighbours(neighbours_of, real_train)
        gm.save_neighbour_grid(neighbours_of, real_train, idx, out / "nearest_neighbours.png")
        torch.save(gen.state_dict(), out / "generator.pt")
        torch.save(disc.state_dict(), out / "discriminator.pt")
        card = cards.gan_card(name, params, metrics)
        (out / "card.md").write_text(card)
        for picture in [out / "grid_10x10.png", out / "progression.gif", out / "nearest_neighbours.png", *frames]:
            mlflow.log_artifact(str(picture), artifact_path="figures")
        track.log_torch_model(gen, "generator", fixed_noise[:4].cpu(), card)
        track.write_run_ref(out / "run.json", run)
    print(f"[train-gan {name}] FID {metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}), IS {metrics['inception_score']:.3f}")


# ---------------------------------------------------------------------------- train-vit / train-cnn
def classifier_fingerprint(params: Params, name: str, data_sha: str) -> str:
    parts = [params.digest("seed", "lr", "data", "augment", name), data_sha, code_digest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def train_classifier(name: str) -> None:
    from .models import build_classifier, count_parameters
    from .train import DeviceData, fit

    if name not in CLASSIFIERS:
        raise SystemExit(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}")
    params, device = _start(f"train-{name}")
    rng = seed_everything(params.seed, device)
    cfg = params.classifier(name)
    ds = params.data.classifier_dataset
    channels, size, _, num_classes = DATASET_SHAPES[ds]
    train_x, train_y, classes = load_subset(ds, "train", params.data.train_fraction, params.seed, device)
    test_x, test_y, _ = load_subset(ds, "test", params.data.test_fraction, params.seed, device)
    policy = Policy.from_json(json.loads(POLICY.read_text()))
    if not cfg.augment:
        policy = Policy.from_json({**policy.to_json(), "crop_padding": 0, "hflip": False, "cutmix_prob": 0.0, "mixup_prob": 0.0, "cutout_prob": 0.0})
    augmenter = BatchAugment(policy, num_classes, rng)
    model = build_classifier(name, params, num_classes, channels, size).to(device)
    if name == "cnn":
        model = model.to(memory_format=torch.channels_last)
    lr = params.learning_rate(name)
    data_sha = data_sha256(PREPARED, ds)

    out = MODELS / name
    out.mkdir(parents=True, exist_ok=True)
    history_path = METRICS / name / "history.csv"
    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_csv(history_path, rows)
        track.log_epoch(row, row["epoch"])

    run_params = {
        **cfg.model_dump(),
        "model": name,
        "arch": getattr(cfg, "arch", "vit"),
        "lr": lr,
        "lr_base": params.lr,
        "seed": params.seed,
        "dataset": ds,
        "train_fraction": params.data.train_fraction,
        "test_fraction": params.data.test_fraction,
        "train_images": len(train_y),
        "test_images": len(test_y),
        "params_count": count_parameters(model),
        **{f"augment.{k}": v for k, v in params.augment.model_dump().items()},
    }
    with track.stage_run(f"train-{name}", name, run_params, _tags(params, device, ds)) as run:
        import mlflow

        started = time.perf_counter()
        history = fit(
            model,
            DeviceData(train_x, train_y),
            DeviceData(test_x, test_y),
            augmenter,
            cfg,
            lr,
            rng,
            checkpoint=CHECKPOINTS / f"{name}.pt",
            fingerprint=classifier_fingerprint(params, name, data_sha),
            on_epoch=on_epoch,
        )
        wall = time.perf_counter() - started
        final = history[-1]
        train_seconds = sum(r["epoch_seconds"] for r in history)
        metrics = {
            "test_acc": final["test_acc"],
            "test_loss": final["test_loss"],
            "train_acc": final["train_acc"],
            "train_loss": final["train_loss"],
            "best_test_acc": max(r["test_acc"] for r in history),
            "params": count_parameters(model),
            "epochs": cfg.epochs,
            "train_seconds": train_seconds,
            "s_per_epoch": train_seconds / len(history),
            "device": str(device),
        }
        write_json(METRICS / f"{name}.json", metrics)
        # Per-epoch metrics are already logged with their step; add only the run-level figures.
        mlflow.log_metrics(
            {"wall_seconds": wall, **{k: metrics[k] for k in ("best_test_acc", "params", "train_seconds", "s_per_epoch")}},
            step=cfg.epochs,
        )
        torch.save(model.state_dict(), out / "model.pt")
        card = cards.classifier_card(name, params, metrics, classes)
        (out / "card.md").write_text(card)
        mlflow.log_artifact(str(out / "card.md"))
        mlflow.log_artifact(str(history_path))
        example = augmenter(test_x[:2], test_y[:2], train=False)[0].float()
        track.log_torch_model(model, "model", example.contiguous(), card)
        track.write_run_ref(out / "run.json", run)
    print(f"[train-{name}] test accuracy {metrics['test_acc']:.4f} in {train_seconds:.1f} s")


# ---------------------------------------------------------------------------- evaluate
def evaluate() -> None:
    import mlflow

    from . import evaluation as ev
    from .heatmaps import attention_rollout, grad_cam, save_heatmap_grid
    from .models import build_classifier

    params, device = _start("evaluate")
    rng = seed_everything(params.seed, device)
    ds = params.data.classifier_dataset
    channels, size, _, num_classes = DATASET_SHAPES[ds]
    test_x, test_y, classes = load_subset(ds, "test", params.data.test_fraction, params.seed, device)
    augmenter = BatchAugment(Policy.from_json(json.loads(POLICY.read_text())), num_classes, rng)

    def normalised(start: int, end: int) -> torch.Tensor:
        return augmenter(test_x[start:end], test_y[start:end], train=False)[0]

    x_host, y_host = test_x.cpu().numpy(), test_y.cpu().numpy()
    FIGURES.mkdir(parents=True, exist_ok=True)
    results, confusions, per_class = {}, {}, {}
    k = min(params.evaluate.heatmap_images, len(test_y))
    mlflow.set_tracking_uri(track.tracking_uri())
    for name in CLASSIFIERS:
        model = build_classifier(name, params, num_classes, channels, size)
        model.load_state_dict(torch.load(MODELS / name / "model.pt", map_location="cpu", weights_only=True))
        model = model.to(device).eval()
        preds, _ = ev.predict(model, normalised, len(test_y), params.classifier(name).eval_batch_size, device)
        metrics = ev.classification_metrics(y_host, preds, classes)
        write_json(METRICS / "eval" / f"{name}_confusion.json", ev.confusion_records(y_host, preds, classes))
        confusions[name] = np.array(metrics["confusion_matrix"])
        per_class[name] = [metrics["per_class"][c]["accuracy"] for c in classes]
        figures = [FIGURES / f"misclassified_{name}.png"]
        ev.misclassified_grid(x_host, y_host, preds, classes, figures[0], n=params.evaluate.misclassified_images)
        if name == "cnn":
            maps, figure = grad_cam(model, model.gradcam_layer, normalised(0, k)), FIGURES / "gradcam_cnn.png"
        else:
            maps, figure = attention_rollout(model, normalised(0, k)), FIGURES / "rollout_vit.png"
        labels = [f"{classes[t]} / {classes[p]}" for t, p in zip(y_host[:k], preds[:k])]
        save_heatmap_grid(x_host[:k], maps.cpu(), labels, figure)
        figures.append(figure)
        results[name] = {key: metrics[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
        results[name]["per_class_accuracy"] = dict(zip(classes, per_class[name]))
        # Evaluation belongs to the training run that made the model: add it there.
        ref = json.loads((MODELS / name / "run.json").read_text())
        with mlflow.start_run(run_id=ref["run_id"]):
            mlflow.log_metrics({f"eval_{key}": float(results[name][key]) for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1")})
            for fig in figures:
                mlflow.log_artifact(str(fig), artifact_path="figures")
        print(f"[evaluate] {name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")

    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_raw.png", normalize=False)
    ev.plot_confusions_side_by_side(confusions, classes, FIGURES / "confusion_normalised.png", normalize=True)
    ev.plot_per_class_accuracy(per_class, classes, FIGURES / "per_class_accuracy.png")
    gans = {}
    for name in GANS:
        gan = json.loads((METRICS / "gan" / f"{name}.json").read_text())
        gans[name] = {key: gan[key] for key in ("fid", "fid_floor", "inception_score", "inception_score_real", "kl_uniform", "n")}
    write_json(METRICS / "evaluate.json", {"classifiers": results, "gans": gans})


# ---------------------------------------------------------------------------- report
def report() -> None:
    from .report import main

    _start("report")
    main()


# ---------------------------------------------------------------------------- entry point
def run_stage(stage, *args) -> None:
    """Run a stage function; known user errors end with their message alone, not a traceback."""
    import sys

    from .config import ConfigError
    from .data import DataError

    try:
        stage(*args)
    except (ConfigError, DataError, track.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
