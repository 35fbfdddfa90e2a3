"""DVC stage `train-judge`: the LeNet MNIST classifier whose features measure the GANs (FID, IS)."""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from reprovision import cards, track  # noqa: E402
from reprovision.judge import train_judge as fit_judge  # noqa: E402
from reprovision.layout import METRICS, MODELS  # noqa: E402
from reprovision.models import count_parameters  # noqa: E402
from reprovision.pixels import to_pm1  # noqa: E402
from reprovision.runtime import seed_everything  # noqa: E402
from reprovision.stage import load_subset, main, run_tags, start, write_json  # noqa: E402


def train_judge() -> None:
    ctx = start("train-judge")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device)
    cfg = params.judge
    train_x, train_y, _ = load_subset("mnist", "train", cfg.train_fraction, params.seed, device)
    test_x, test_y, _ = load_subset("mnist", "test", 1.0, params.seed, device)
    out = MODELS / "judge"
    run_params = {**cfg.model_dump(), "seed": params.seed, "threads": ctx.threads, "dataset": "mnist"}
    with track.stage_run("train-judge", "judge", run_params, run_tags(ctx, "mnist"), params) as run:
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
        track.log_torch_model(judge, "model", to_pm1(test_x[:4]).cpu(), card)
        track.write_run_ref(out / "run.json", run)
    print(f"[train-judge] test accuracy {final['test_acc']:.4f}")


if __name__ == "__main__":
    main(train_judge)
