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
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from reprovision.config import DATASET_SHAPES, GANConfig, Params  # noqa: E402
from reprovision.core import checkpoint, track_log, track_run  # noqa: E402
from reprovision.core.context import Context, load_subset, run_tags, start  # noqa: E402
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


@dataclass
class EpochWork:
    """What the stage does beside training, epoch by epoch: the FID curve, the sample frames from fixed
    noise, the history rows. Kept in the checkpoint too (`extra`, `on_resume`): a resumed run rewrites
    the earlier frames, whose PNGs DVC deleted."""

    gen: torch.nn.Module
    judge: LeNet
    real_test: torch.Tensor  # the test images in [-1, 1], what the FID compares samples with
    fixed_noise: torch.Tensor  # the same 100 noise vectors every frame
    samples: Path  # the frames' folder
    gcfg: GANConfig
    seed: int
    latent_dim: int
    device: torch.device
    frame_images: dict[int, torch.Tensor] = field(default_factory=dict)  # epoch -> samples (100,1,28,28) on CPU
    fid_curve: list[dict] = field(default_factory=list)
    history_rows: list[dict] = field(default_factory=list)
    resumed_after: int = 0  # the epochs up to here are replayed from the checkpoint, not measured again
    seconds_before: float = 0.0  # training time of the earlier attempts, when resumed
    started: float = 0.0  # perf_counter() when this attempt's training started

    def generate(self, noise_batches) -> torch.Tensor:
        """The generator's images for the given noise, in eval mode (BatchNorm running stats, no dropout)."""
        self.gen.eval()
        with torch.no_grad():
            fakes = torch.cat([self.gen(z) for z in noise_batches])
        self.gen.train()
        return fakes

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self.generate(
            torch.randn(min(1000, n - i), self.latent_dim, device=self.device, generator=g) for i in range(0, n, 1000)
        )

    def frame_path(self, epoch: int) -> Path:
        return self.samples / f"epoch_{epoch:03d}.png"

    def frame_paths(self) -> list[Path]:
        return [self.frame_path(epoch) for epoch in sorted(self.frame_images)]

    def snapshot(self, epoch: int) -> None:
        self.frame_images[epoch] = self.generate([self.fixed_noise]).cpu()
        gm.save_grid(self.frame_images[epoch], self.frame_path(epoch), nrow=10)

    def on_epoch(self, epoch: int, row: dict) -> None:
        gcfg = self.gcfg
        if epoch > self.resumed_after:  # a new epoch: measure it (a replayed row already carries its FID)
            if gcfg.fid_every and (epoch % gcfg.fid_every == 0 or epoch == gcfg.epochs):
                n = min(gcfg.fid_samples_during, len(self.real_test))
                # Its own name: the final "fid" uses gan.fid_samples images, and FID depends on N.
                row["fid_during"] = gm.frechet_distance(self.judge, self.real_test[:n], self.sample(n, self.seed + 2))
                print(f"          FID({n}) {row['fid_during']:.3f}", flush=True)
            if epoch % gcfg.sample_every == 0 or epoch == gcfg.epochs:
                self.snapshot(epoch)
        if "fid_during" in row:
            self.fid_curve.append({"epoch": epoch, "fid": row["fid_during"]})
        self.history_rows.append(
            {k: row[k] for k in ("epoch", "d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds")}
        )
        track_log.log_epoch(row, epoch)

    def on_resume(self, epoch: int, extra: dict) -> None:
        """Back to the state after `epoch`: the earlier frames (DVC deleted their PNGs), the time spent."""
        self.resumed_after = epoch
        self.seconds_before = extra["seconds"]
        self.frame_images.clear()
        for frame_epoch, images in sorted(extra["frames"].items()):
            self.frame_images[frame_epoch] = images
            gm.save_grid(images, self.frame_path(frame_epoch), nrow=10)

    def seconds(self) -> float:
        """Training time so far, the earlier attempts' included."""
        return self.seconds_before + time.perf_counter() - self.started

    def extra(self) -> dict:
        """This stage's state after an epoch, saved with the checkpoint (the FID values are in the history rows)."""
        return {"frames": dict(self.frame_images), "seconds": self.seconds()}


def resume_fingerprint(ctx: Context, name: str, data_sha256: str) -> str:
    """Everything that shapes the result (checkpoint.py adds the code): the params this stage reads
    (dvc.yaml's list), the data, the judge that measures the FID curve."""
    params = ctx.params
    reads = {
        "seed": params.seed,
        "data.gan_dataset": params.data.gan_dataset,
        "gan": {k: v for k, v in params.gan.model_dump().items() if k not in GANS},
        f"gan.{name}": getattr(params.gan, name).model_dump(),
    }
    return checkpoint.fingerprint(
        json.dumps(reads, sort_keys=True),
        data_sha256,
        hashlib.sha256(JUDGE_WEIGHTS.read_bytes()).hexdigest(),
        ctx.threads,
        ctx.device,
        params.deterministic,
    )


def gan_run_params(ctx: Context, name: str, gen: torch.nn.Module, disc: torch.nn.Module) -> dict:
    """The run's MLflow params: the model's config, the shared GAN settings, the run's setting, the sizes."""
    params, gcfg = ctx.params, ctx.params.gan
    return {
        **getattr(gcfg, name).model_dump(),
        **{k: v for k, v in gcfg.model_dump().items() if k not in GANS},
        "seed": params.seed,
        "threads": ctx.threads,
        "deterministic": params.deterministic,
        "dataset": "mnist",
        "model": name,
        "g_params": count_parameters(gen),
        "d_params": count_parameters(disc),
    }


def measure(work: EpochWork, train_x: torch.Tensor, total: float, run_params: dict) -> tuple[dict, torch.Tensor]:
    """The whole record of the trained generator (the judge's quality measures, the last losses, the time),
    and the training images in [-1, 1], which the nearest-neighbour figure compares with too."""
    gcfg = work.gcfg
    n = min(gcfg.fid_samples, len(work.real_test))
    fakes = work.sample(n, work.seed + 3)
    real_train = to_pm1(train_x)  # only now: no float copy of the train set held during training
    quality = gm.gan_quality(
        work.judge,
        fakes,
        work.real_test,
        real_train,
        n,
        torch.Generator(device=work.device).manual_seed(work.seed + 4),
    )
    last = work.history_rows[-1]
    metrics = {
        **quality,
        "d_loss": last["d_loss"],
        "g_loss": last["g_loss"],
        "epochs": gcfg.epochs,
        "total_seconds": total,
        "s_per_epoch": total / gcfg.epochs,
        "g_params": run_params["g_params"],
        "d_params": run_params["d_params"],
        "device": str(work.device),
    }
    return metrics, real_train


def write_metrics(name: str, metrics: dict, work: EpochWork) -> None:
    """The metrics files dvc.yaml declares, then the final figures to MLflow (the losses are there per epoch)."""
    write_json(GAN_METRICS / name / SUMMARY, metrics)  # the whole record (report, card)
    write_json(METRICS / "gan" / f"{name}.json", {k: metrics[k] for k in HEADLINE}, sort_keys=False)  # `dvc exp show`
    write_csv(METRICS / "gan" / name / "history.csv", work.history_rows)
    write_csv(METRICS / "gan" / name / "fid.csv", work.fid_curve or [{"epoch": 0, "fid": float("nan")}])
    per_epoch = {"d_loss", "g_loss"}  # logged with their step already
    track_log.log_metrics({k: v for k, v in metrics.items() if k not in per_epoch}, step=work.gcfg.epochs)


def save_pictures(work: EpochWork, out: Path, real_train: torch.Tensor) -> None:
    """The final pictures: 100 samples, the progression of the fixed-noise frames, the nearest training images."""
    gm.save_grid(work.sample(100, work.seed + 5), out / "grid_10x10.png", nrow=10)
    gm.save_progression_gif(work.frame_paths(), out / "progression.gif")
    neighbours_of = work.sample(16, work.seed + 6)
    idx = gm.nearest_neighbours(neighbours_of, real_train)
    gm.save_neighbour_grid(neighbours_of, real_train, idx, out / "nearest_neighbours.png")


def save_model(name: str, params: Params, out: Path, gen: torch.nn.Module, disc: torch.nn.Module, metrics: dict) -> str:
    """The weights and the model card; the card is returned, as the MLflow model's description too."""
    torch.save(gen.state_dict(), out / "generator.pt")
    torch.save(disc.state_dict(), out / "discriminator.pt")
    card = cards.gan_card(name, params, metrics)
    (out / "card.md").write_text(card)
    return card


def log_generator(name: str, out: Path, work: EpochWork, *, card: str, run_params: dict, tags: dict):
    """The pictures as MLflow artifacts and the generator as an MLflow model; what log_model logged."""
    track_log.log_artifacts(
        out / "grid_10x10.png",
        out / "progression.gif",
        out / "nearest_neighbours.png",
        *work.frame_paths(),
        folder="figures",
    )
    return track_log.log_model(
        RawImageGenerator(work.gen),
        name=f"gan-{name}-generator",
        example=work.fixed_noise[:4],
        description=card,
        params=run_params,
        run_tags=tags,
        step=work.gcfg.epochs,
        metadata={
            "input": f"float32 latent vectors (N, {work.latent_dim}), standard normal",
            "output": "uint8 images (N, 1, 28, 28) in [0, 255]",
        },
    )


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
    work = EpochWork(gen, judge, to_pm1(test_x), fixed_noise, samples, gcfg, params.seed, mcfg.latent_dim, device)

    tags = run_tags(ctx, "mnist")
    fingerprint = resume_fingerprint(ctx, name, tags["data_sha256"])
    run_params = gan_run_params(ctx, name, gen, disc)
    with track_run.stage_run("train-gan", f"gan-{name}", run_params, tags, params, system_metrics=True) as run:
        track_log.log_datasets(Path.cwd(), "mnist", tags["data_sha256"], {"train": len(train_x), "test": len(test_x)})
        work.snapshot(0)
        work.started = time.perf_counter()
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
            work.on_epoch,
            gcfg.steps_per_epoch_max,
            checkpoint=CHECKPOINTS / f"gan-{name}.pt",
            fingerprint=fingerprint,
            extra=work.extra,
            on_resume=work.on_resume,
        )
        metrics, real_train = measure(work, train_x, work.seconds(), run_params)
        write_metrics(name, metrics, work)
        save_pictures(work, out, real_train)
        card = save_model(name, params, out, gen, disc, metrics)
        logged = log_generator(name, out, work, card=card, run_params=run_params, tags=tags)
        track_log.write_run_ref(out / "run.json", run, logged)
    print(
        f"[train-gan {name}] FID {metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}), IS "
        f"{metrics['inception_score']:.3f}"
    )


if __name__ == "__main__":
    main(train_gan, *sys.argv[1:2])
