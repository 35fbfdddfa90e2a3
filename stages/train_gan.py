"""DVC stage `train-gan@<mlp|dcgan>`: one reference GAN on MNIST (R1 MLP GAN, R2 DCGAN), then its
quality measured by the judge: FID against the real-vs-real floor, Inception Score, class coverage,
sample grids from fixed noise, the progression GIF, nearest training neighbours.

Training resumes like the classifiers': each epoch ends with a checkpoint in checkpoints/gan-<name>.pt
(outside DVC's outputs), which also holds this stage's per-epoch side work (the sample frames'
images, the FID curve inside the history rows, the seconds spent), since DVC deletes the earlier
attempt's outputs before it runs the stage again.
"""

import sys
from pathlib import Path

# This checkout's library, also inside DVC's temporary experiment copies.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from reprovision.config import DATASET_SHAPES  # noqa: E402
from reprovision.core import checkpoint, track_log, track_run  # noqa: E402
from reprovision.core.context import load_subset, run_tags, start  # noqa: E402
from reprovision.core.runtime import seed_everything  # noqa: E402
from reprovision.core.stage import main, write_csv, write_json  # noqa: E402
from reprovision.data.pixels import to_pm1  # noqa: E402
from reprovision.layout import CHECKPOINTS, GAN_METRICS, GANS, METRICS, MODELS, SUMMARY  # noqa: E402
from reprovision.measure import gan_metrics as gm  # noqa: E402
from reprovision.models import count_parameters  # noqa: E402
from reprovision.models.gan import build_gan  # noqa: E402
from reprovision.models.judge import LeNet  # noqa: E402
from reprovision.publish import cards  # noqa: E402
from reprovision.publish.serving import RawImageGenerator  # noqa: E402
from reprovision.training.fit_gan import (
    fit_gan,  # noqa: E402
    gan_optimizers,  # noqa: E402
)

JUDGE_WEIGHTS = MODELS / "judge" / "model.pt"
HEADLINE = ("fid", "inception_score", "total_seconds")  # metrics/gan/<name>.json: what `dvc exp show` shows


def load_judge(device: torch.device) -> LeNet:
    judge = LeNet()
    judge.load_state_dict(torch.load(JUDGE_WEIGHTS, map_location="cpu", weights_only=True))
    return judge.to(device).eval()


def train_gan(name: str) -> None:
    if name not in GANS:
        raise SystemExit(f"unknown GAN {name!r}; allowed: {', '.join(GANS)}")
    ctx = start(f"train-gan {name}")
    params, device = ctx.params, ctx.device
    rng = seed_everything(params.seed, device, params.deterministic)
    gcfg = params.gan
    mcfg = getattr(gcfg, name)
    train_x, train_y, _ = load_subset("mnist", "train", gcfg.train_fraction, params.seed, device)
    test_x, _, _ = load_subset("mnist", "test", 1.0, params.seed, device)
    judge = load_judge(device)
    gen, disc = build_gan(name, mcfg, DATASET_SHAPES[params.data.gan_dataset][:3])
    gen, disc = gen.to(device), disc.to(device)
    opt_g, opt_d = gan_optimizers(gen, disc, mcfg, device)

    out = MODELS / "gan" / name
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    # A fixed noise batch, drawn from its own seeded generator, shows the same 100 digits evolving.
    noise_rng = torch.Generator(device=device).manual_seed(params.seed + 1)
    fixed_noise = torch.randn(100, mcfg.latent_dim, device=device, generator=noise_rng)
    real_test = to_pm1(test_x)
    # Per-epoch side work, kept in the checkpoint too: a resumed run rewrites the earlier frames.
    frame_images: dict[int, torch.Tensor] = {}  # epoch -> the fixed-noise samples (100,1,28,28) on the CPU
    fid_curve: list[dict] = []
    resumed_after = 0  # the epochs up to here are replayed from the checkpoint, not measured again
    seconds_before = 0.0  # training time of the earlier attempts, when resumed

    def generate(noise_batches) -> torch.Tensor:
        """The generator's images for the given noise, in eval mode (BatchNorm running stats, no dropout)."""
        gen.eval()
        with torch.no_grad():
            fakes = torch.cat([gen(z) for z in noise_batches])
        gen.train()
        return fakes

    def sample(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        return generate(
            torch.randn(min(1000, n - i), mcfg.latent_dim, device=device, generator=g) for i in range(0, n, 1000)
        )

    def frame_path(epoch: int) -> Path:
        return samples / f"epoch_{epoch:03d}.png"

    def snapshot(epoch: int) -> None:
        frame_images[epoch] = generate([fixed_noise]).cpu()
        gm.save_grid(frame_images[epoch], frame_path(epoch), nrow=10)

    history_rows: list[dict] = []

    def on_epoch(epoch: int, row: dict) -> None:
        if epoch > resumed_after:  # a new epoch: measure it (a replayed row already carries its FID)
            if gcfg.fid_every and (epoch % gcfg.fid_every == 0 or epoch == gcfg.epochs):
                n = min(gcfg.fid_samples_during, len(real_test))
                # Its own name: the final "fid" uses gan.fid_samples images, and FID depends on N.
                row["fid_during"] = gm.frechet_distance(judge, real_test[:n], sample(n, params.seed + 2))
                print(f"          FID({n}) {row['fid_during']:.3f}", flush=True)
            if epoch % gcfg.sample_every == 0 or epoch == gcfg.epochs:
                snapshot(epoch)
        if "fid_during" in row:
            fid_curve.append({"epoch": epoch, "fid": row["fid_during"]})
        history_rows.append({k: row[k] for k in ("epoch", "d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds")})
        track_log.log_epoch(row, epoch)

    def on_resume(epoch: int, extra: dict) -> None:
        """Back to the state after `epoch`: the earlier frames (DVC deleted their PNGs), the time spent."""
        nonlocal resumed_after, seconds_before
        resumed_after = epoch
        seconds_before = extra["seconds"]
        frame_images.clear()
        for frame_epoch, images in sorted(extra["frames"].items()):
            frame_images[frame_epoch] = images
            gm.save_grid(images, frame_path(frame_epoch), nrow=10)

    def extra() -> dict:
        """This stage's state after an epoch, saved with the checkpoint (the FID values are in the history rows)."""
        return {"frames": dict(frame_images), "seconds": seconds_before + time.perf_counter() - started}

    tags = run_tags(ctx, "mnist")
    # The resume fingerprint: everything that shapes the result (checkpoint.py adds the code). The
    # params this stage reads (dvc.yaml's list), the data, the judge that measures the FID curve.
    reads = {
        "seed": params.seed,
        "data.gan_dataset": params.data.gan_dataset,
        "gan": {k: v for k, v in gcfg.model_dump().items() if k not in GANS},
        f"gan.{name}": mcfg.model_dump(),
    }
    fingerprint = checkpoint.fingerprint(
        json.dumps(reads, sort_keys=True),
        tags["data_sha256"],
        hashlib.sha256(JUDGE_WEIGHTS.read_bytes()).hexdigest(),
        ctx.threads,
        device,
        params.deterministic,
    )

    run_params = {
        **mcfg.model_dump(),
        **{k: v for k, v in gcfg.model_dump().items() if k not in GANS},
        "seed": params.seed,
        "threads": ctx.threads,
        "deterministic": params.deterministic,
        "dataset": "mnist",
        "model": name,
        "g_params": count_parameters(gen),
        "d_params": count_parameters(disc),
    }
    model_name = f"gan-{name}-generator"
    with track_run.stage_run("train-gan", f"gan-{name}", run_params, tags, params, system_metrics=True) as run:
        track_log.log_datasets(Path.cwd(), "mnist", tags["data_sha256"], {"train": len(train_x), "test": len(test_x)})
        snapshot(0)
        started = time.perf_counter()
        fit_gan(
            gen,
            disc,
            opt_g,
            opt_d,
            train_x,
            mcfg.latent_dim,
            mcfg.batch_size,
            gcfg.epochs,
            rng,
            on_epoch,
            gcfg.steps_per_epoch_max,
            checkpoint=CHECKPOINTS / f"gan-{name}.pt",
            fingerprint=fingerprint,
            extra=extra,
            on_resume=on_resume,
        )
        total = seconds_before + time.perf_counter() - started
        frames = [frame_path(epoch) for epoch in sorted(frame_images)]

        n = min(gcfg.fid_samples, len(real_test))
        fakes = sample(n, params.seed + 3)
        real_train = to_pm1(train_x)  # only now: no float copy of the train set held during training
        quality = gm.gan_quality(
            judge, fakes, real_test, real_train, n, torch.Generator(device=device).manual_seed(params.seed + 4)
        )
        last = history_rows[-1]
        metrics = {
            **quality,
            "d_loss": last["d_loss"],
            "g_loss": last["g_loss"],
            "epochs": gcfg.epochs,
            "total_seconds": total,
            "s_per_epoch": total / gcfg.epochs,
            "g_params": run_params["g_params"],
            "d_params": run_params["d_params"],
            "device": str(device),
        }
        write_json(GAN_METRICS / name / SUMMARY, metrics)  # the whole record (report, card)
        write_json(
            METRICS / "gan" / f"{name}.json", {k: metrics[k] for k in HEADLINE}, sort_keys=False
        )  # for `dvc exp show`
        write_csv(METRICS / "gan" / name / "history.csv", history_rows)
        write_csv(METRICS / "gan" / name / "fid.csv", fid_curve or [{"epoch": 0, "fid": float("nan")}])
        per_epoch = {"d_loss", "g_loss"}  # logged with their step already
        track_log.log_metrics({k: v for k, v in metrics.items() if k not in per_epoch}, step=gcfg.epochs)

        gm.save_grid(sample(100, params.seed + 5), out / "grid_10x10.png", nrow=10)
        gm.save_progression_gif(frames, out / "progression.gif")
        neighbours_of = sample(16, params.seed + 6)
        idx = gm.nearest_neighbours(neighbours_of, real_train)
        gm.save_neighbour_grid(neighbours_of, real_train, idx, out / "nearest_neighbours.png")
        torch.save(gen.state_dict(), out / "generator.pt")
        torch.save(disc.state_dict(), out / "discriminator.pt")
        card = cards.gan_card(name, params, metrics)
        (out / "card.md").write_text(card)
        track_log.log_artifacts(
            out / "grid_10x10.png", out / "progression.gif", out / "nearest_neighbours.png", *frames, folder="figures"
        )
        logged = track_log.log_model(
            RawImageGenerator(gen),
            name=model_name,
            example=fixed_noise[:4],
            description=card,
            params=run_params,
            run_tags=tags,
            step=gcfg.epochs,
            metadata={
                "input": f"float32 latent vectors (N, {mcfg.latent_dim}), standard normal",
                "output": "uint8 images (N, 1, 28, 28) in [0, 255]",
            },
        )
        track_log.write_run_ref(out / "run.json", run, logged)
    print(
        f"[train-gan {name}] FID {metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}), IS "
        f"{metrics['inception_score']:.3f}"
    )


if __name__ == "__main__":
    main(train_gan, *sys.argv[1:2])
