"""DVC stage `train-judge`: the LeNet MNIST classifier whose features measure the GANs (FID, IS)."""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from reprovision.core import track_log, track_run  # noqa: E402
from reprovision.core.context import load_subset, run_tags, start  # noqa: E402
from reprovision.core.runtime import seed_everything  # noqa: E402
from reprovision.core.stage import main, write_json  # noqa: E402
from reprovision.layout import METRICS, MODELS, SUMMARY  # noqa: E402
from reprovision.models import count_parameters  # noqa: E402
from reprovision.publish import cards  # noqa: E402
from reprovision.publish.serving import RawImageClassifier  # noqa: E402
from reprovision.training.fit_judge import fit_judge  # noqa: E402


def train_judge() -> None:
    ctx = start("train-judge")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device, params.deterministic)
    cfg = params.judge
    train_x, train_y, _ = load_subset("mnist", "train", cfg.train_fraction, params.seed, device)
    test_x, test_y, _ = load_subset("mnist", "test", 1.0, params.seed, device)
    out = MODELS / "judge"
    run_params = {**cfg.model_dump(), "seed": params.seed, "threads": ctx.threads, "dataset": "mnist"}
    tags = run_tags(ctx, "mnist")
    with track_run.stage_run("train-judge", "judge", run_params, tags, params, system_metrics=True) as run:
        track_log.log_datasets(Path.cwd(), "mnist", tags["data_sha256"], {"train": len(train_x), "test": len(test_x)})
        judge, history = fit_judge(train_x, train_y, test_x, test_y, cfg, device, rng)
        for row in history:  # named as the judge's, so that they stay out of the classifiers' charts
            track_log.log_epoch({f"judge_{k}": v for k, v in row.items() if k != "epoch"}, row["epoch"])
        final = history[-1]
        out.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), out / "model.pt")
        metrics = {
            "test_acc": final["test_acc"],
            "params": count_parameters(judge),
            "epochs": cfg.epochs,
            "device": str(device),
        }
        write_json(METRICS / "judge" / SUMMARY, metrics)  # the whole record (report, card)
        write_json(METRICS / "judge.json", {"test_acc": metrics["test_acc"]})  # for `dvc exp show`
        card = cards.judge_card(params, metrics)
        (out / "card.md").write_text(card)
        # Served with the judge's own scaling, x / 127.5 - 1 (pixels.to_pm1), as a mean and std of 0.5.
        served = RawImageClassifier(judge, mean=[0.5], std=[0.5])
        logged = track_log.log_model(
            served,
            name="judge",
            example=test_x[:4],
            description=card,
            params=run_params,
            step=cfg.epochs,
            run_tags=tags,
            metadata={
                "classes": [str(d) for d in range(10)],
                "input": "uint8 images (N, 1, 28, 28) in [0, 255]",
                "output": "digit probabilities (N, 10)",
            },
        )
        track_log.write_run_ref(out / "run.json", run, logged)
    print(f"[train-judge] test accuracy {final['test_acc']:.4f}")


if __name__ == "__main__":
    main(train_judge)
