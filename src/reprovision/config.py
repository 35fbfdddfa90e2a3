"""One typed config that mirrors `params.yaml`, checked before any compute.

Every stage calls `load_params()` first. A mistake in `params.yaml` (a typo'd key, a
negative learning rate, a patch size that does not tile the image) stops the stage with
one message that names the key, the bad value and what is allowed, before a byte of data
is read.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

PARAMS_FILE = Path("params.yaml")

# Image geometry of every dataset the pipeline knows: (channels, height, width, classes).
DATASET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
    "cifar100": (3, 32, 32, 100),
}
# Images in the official (train, test) splits: what params can be checked against before any data is read.
DATASET_SIZES: dict[str, tuple[int, int]] = {
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
}


class ConfigError(ValueError):
    """A bad value in params.yaml (or the environment): the message says what and how to fix it."""


def _not_a_bool(value: Any) -> Any:
    # Pydantic would read `epochs: true` as 1 (and `lr: true` as 1.0): in a config that is a slip.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not true/false")
    return value


NotBool = BeforeValidator(_not_a_bool)


def _thread_count(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise PydanticCustomError("threads", "Input should be a whole number greater than 0, or 'auto'")


Threads = Annotated[int | Literal["auto"], PlainValidator(_thread_count)]
Fraction = Annotated[float, Field(gt=0, le=1), NotBool]
Probability = Annotated[float, Field(ge=0, le=1), NotBool]
BelowOne = Annotated[float, Field(ge=0, lt=1), NotBool]  # Adam betas, SGD momentum, label smoothing
PositiveFloat = Annotated[float, Field(gt=0), NotBool]
NonNegativeFloat = Annotated[float, Field(ge=0), NotBool]
PositiveInt = Annotated[int, Field(gt=0), NotBool]
Widths = Annotated[list[PositiveInt], Field(min_length=1)]  # layer widths: a network needs at least one
NonNegativeInt = Annotated[int, Field(ge=0), NotBool]


Scheduler = Literal["none", "cosine", "step", "warmup_cosine", "warmup_linear"]  # optim.build_scheduler
# The recipes of reprovision/tools/recipes.py (tests/test_recipes.py keeps the two lists equal), named here and not
# imported: every stage reads this module, and editing a recipe's values must not re-run the whole DAG.
RecipeName = Literal["none", "reference", "improved", "vit-long", "vit-modern", "airbench94", "vit-hybrid"]


class Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key; allow_inf_nan=False
    # a `-S lr=inf` (or nan) into one, instead of a run that trains into NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    classifier_dataset: Literal["cifar10", "cifar100"] = "cifar10"
    gan_dataset: Literal["mnist"] = "mnist"
    train_fraction: Fraction = 1.0  # deterministic, class-stratified subset of the train split
    # Held out of that subset (class-stratified) for every decision: model selection, tuning, "best".
    # 0 keeps the references' full training set; the test split then only reports.
    val_fraction: BelowOne = 0.0
    test_fraction: Fraction = 1.0  # the same for the test split


class AugmentConfig(Section):
    """Training-time augmentation of the classifier dataset (batched tensor ops, see augment.py)."""

    crop_padding: NonNegativeInt = 4  # random crop after padding by this many pixels
    pad_mode: Literal["zeros", "reflect"] = "zeros"
    hflip: bool = True
    # hflip as airbench: a fixed half of the images mirrored in odd epochs, the other half in even ones
    alternate_flips: bool = False
    trivial_augment: bool = False  # one TrivialAugmentWide op per image (batched, augment.trivial_augment)
    erasing_prob: Probability = 0.0  # random erasing per image
    cutmix_prob: Probability = 0.0  # per mini-batch, as in R4
    cutmix_alpha: PositiveFloat = 1.0  # box area ratio ~ Beta(alpha, alpha)
    mixup_prob: Probability = 0.0
    mixup_alpha: PositiveFloat = 0.2
    cutout_prob: Probability = 0.0  # per image
    cutout_size: PositiveInt = 8
    preview_images: PositiveInt = 64


class MLPGANConfig(Section):
    """R1: the MLP GAN, TTUR Adam."""

    latent_dim: PositiveInt = 128
    g_hidden: Widths = [128, 256, 512, 1024]
    d_hidden: Widths = [512, 256]
    g_dropout: Probability = 0.0  # R1's variant used 0.3
    d_dropout: Probability = 0.6
    lr_g: PositiveFloat = 1e-4
    lr_d: PositiveFloat = 4e-4
    beta1: BelowOne = 0.0
    beta2: BelowOne = 0.9
    batch_size: PositiveInt = 64

    def describe(self) -> str:
        """The architecture in one line (the model card)."""
        return (
            f"MLP GAN (R1): latent {self.latent_dim}, G hidden {self.g_hidden}, D hidden {self.d_hidden}, "
            f"D dropout {self.d_dropout}"
        )


class DCGANConfig(Section):
    """R2: the Keras DCGAN, rebuilt in PyTorch."""

    latent_dim: PositiveInt = 100
    # Channels of the generator's last transposed conv and the discriminator's first conv (R2: 64);
    # the other conv layers have 2x and 4x. A narrower net is ~2.5x faster per image at 32 (CPU-sized run).
    width: PositiveInt = 64
    lr_g: PositiveFloat = 3e-4
    lr_d: PositiveFloat = 3e-4
    beta1: BelowOne = 0.5
    beta2: BelowOne = 0.999
    init_std: PositiveFloat = 0.02
    batch_size: PositiveInt = 32

    def describe(self) -> str:
        """The architecture in one line (the model card)."""
        w = self.width
        return (
            f"DCGAN (R2{'' if w == 64 else f', narrowed to width {w}'}): noise {self.latent_dim}, Dense 7x7x{4 * w}, "
            f"ConvTranspose {2 * w}/{w}, Conv 1; D Conv {w}/{2 * w}; N(0, {self.init_std}) init"
        )


class GANConfig(Section):
    epochs: PositiveInt = 50
    sample_every: PositiveInt = 10  # sample grids at epochs 0, k, 2k, ..., last
    fid_every: NonNegativeInt = 5  # FID curve during training every k epochs (0: off)
    # FID needs a covariance, so at least 2 images (and far more for a stable figure).
    fid_samples_during: Annotated[int, Field(ge=2), NotBool] = 2000  # N for the cheap in-training FID
    fid_samples: Annotated[int, Field(ge=2), NotBool] = (
        10000  # N generated vs N test images for the final FID/IS (FID is biased by N)
    )
    train_fraction: Fraction = (
        1.0  # of MNIST train; separate from data.train_fraction so data-size studies don't retrain GANs
    )
    steps_per_epoch_max: NonNegativeInt = 0  # 0: full epochs; >0 caps steps per epoch (benchmarks only)
    mlp: MLPGANConfig = MLPGANConfig()
    dcgan: DCGANConfig = DCGANConfig()


class JudgeConfig(Section):
    """The LeNet-style MNIST classifier whose features measure GAN quality (FID, IS)."""

    epochs: PositiveInt = 4
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    train_fraction: Fraction = 1.0


class TrainConfig(Section):
    """What the one classifier training loop needs: the base of every classifier family's section.

    A section of `Params` typed as a subclass of this IS a classifier family to the pipeline
    (`CLASSIFIERS` below): its `train-<name>` stage, its models/<name>/ folder, its registry name.
    A subclass adds its architecture's fields and may check them against the images."""

    label: ClassVar[str]  # the name people read: report, cards, registry, charts

    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1000
    # The learning rate is the top-level `lr` times this multiplier, so that
    # `dvc exp run -S lr=4e-4` moves both classifiers and per-model ratios stay explicit.
    lr_mult: PositiveFloat = 1.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: NonNegativeFloat = 0.0
    momentum: BelowOne = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    scheduler: Scheduler = "none"
    step_size: PositiveInt = 15  # step scheduler, in epochs
    gamma: PositiveFloat = 0.1  # step scheduler
    warmup_epochs: NonNegativeInt = 0  # warmup_cosine
    # warmup_linear (airbench): lr x lr_start_factor rising linearly to lr over warmup_fraction of the
    # steps, then falling linearly to lr x lr_end_factor
    warmup_fraction: BelowOne = 0.23
    lr_start_factor: PositiveFloat = 0.2
    lr_end_factor: NonNegativeFloat = 0.07
    # The normalisation layers' lr is lr x this, their weight decay / this (airbench raises it on BN biases)
    norm_lr_mult: PositiveFloat = 1.0
    # airbench's lookahead: every N steps (0: off) the weights join their moving average (optim.Lookahead)
    lookahead_every: NonNegativeInt = 0
    lookahead_decay: BelowOne = 0.95
    # Test-time augmentation in evaluate and the served model (models/tta.py): the mean logits over the
    # image and its mirror, and, with mirror_translate, also over both shifted by one pixel (airbench)
    tta: Literal["none", "mirror", "mirror_translate"] = "none"
    # No weight decay on biases, normalisation weights and what the model's `no_weight_decay()` names
    # (the ViT's position embedding and [CLS] token), as DeiT/timm train ViTs
    decay_exempt: bool = False
    # An exponential moving average of the weights, kept beside them (0: none); evaluate scores both
    ema_decay: BelowOne = 0.0
    label_smoothing: BelowOne = 0.0
    grad_clip: NonNegativeFloat = 0.0  # max global grad norm; 0 disables
    sam: Literal["none", "sam", "asam"] = "none"
    sam_rho: PositiveFloat = 0.05
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device computes it natively (runtime.py)
    # The attention kernel on the CPU (runtime.attention_backend): torch's default, or "math", faster here
    cpu_attention: Literal["default", "math"] = "default"
    # The optimiser on the CPU: torch's default (for-each) kernels, or its fused ones, one pass per parameter
    # (x1.11 on the hybrid ViT, BENCHMARKS "ViT speed levers"): other floats, so off by default. CUDA always fuses.
    cpu_optimizer: Literal["default", "fused"] = "default"
    compile: bool = False
    augment: bool = True  # apply the augment-stage policy to training batches
    # Stop after this many epochs without a better validation accuracy (0: train every epoch). Needs
    # data.val_fraction > 0; with a validation split the best epoch's weights ship either way.
    early_stop: NonNegativeInt = 0

    def architecture(self) -> str:
        """A short name of what this section builds (the run param `arch`)."""
        return "".join(c for c in self.label.lower() if c.isalnum())

    def check_images(self, key: str, height: int, width: int, dataset: str) -> None:
        """Raise ValueError naming `key` when these params cannot be built for `dataset`'s images."""


def _check_halvings(key: str, widths: list[int], height: int, width: int, dataset: str) -> None:
    if min(height, width) < 2 ** len(widths):
        raise ValueError(
            f"{key}.widths has {len(widths)} blocks, each halving the {height}x{width} images of "
            f"{dataset}; use at most {min(height, width).bit_length() - 1} widths"
        )


class ViTConfig(TrainConfig):
    label: ClassVar[str] = "ViT"
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: NonNegativeFloat = 0.05
    scheduler: Scheduler = "cosine"
    # patch: R3's patch embedding; hybrid: a convolutional tokenizer (CCT) of tokenizer_widths, then embed_dim
    arch: Literal["patch", "hybrid"] = "patch"
    tokenizer_widths: Annotated[list[PositiveInt], Field(max_length=2)] = [64, 128]  # hybrid: at most 3 convs
    tokenizer_final_pool: bool = False  # hybrid: a 2x2 max-pool after the last conv too (a quarter of the tokens)
    tokenizer_pool_first: bool = False  # hybrid: each conv's 2x2 max-pool before its BN and GELU (airbench's order)
    patch_size: PositiveInt = 4  # patch
    embed_dim: PositiveInt = 192
    depth: PositiveInt = 12
    heads: PositiveInt = 3
    mlp_ratio: PositiveFloat = 4.0
    dropout: Probability = 0.1
    drop_path: Probability = 0.0  # stochastic depth: the last block's rate, rising linearly from 0 at the first
    pool: Literal["cls", "seq"] = "cls"  # what the head reads: a [CLS] token (R3) | CCT's sequence pooling

    def architecture(self) -> str:
        """R3's ViT keeps the run param `arch` it always had (the family's name); the hybrid says so."""
        return super().architecture() if self.arch == "patch" else self.arch

    def token_stride(self) -> int:
        """Image pixels per token side: the patch size, or the hybrid tokenizer's 2 x 2 pools."""
        return (
            self.patch_size if self.arch == "patch" else 2 ** (len(self.tokenizer_widths) + self.tokenizer_final_pool)
        )

    def check_images(self, key: str, height: int, width: int, dataset: str) -> None:
        side = math.gcd(height, width)
        if self.arch == "hybrid" and side % self.token_stride():
            raise ValueError(
                f"{key}.tokenizer_widths has {len(self.tokenizer_widths)} widths (and tokenizer_final_pool = "
                f"{self.tokenizer_final_pool}), each pool halving the {height}x{width} images of {dataset}; "
                "use fewer widths or no final pool"
            )
        if self.arch == "patch" and side % self.patch_size:
            raise ValueError(
                f"{key}.patch_size = {self.patch_size} does not tile the {height}x{width} images of "
                f"{dataset}; allowed: a divisor of {side}, e.g. {_divisors(side)}"
            )
        if self.embed_dim % self.heads:
            raise ValueError(
                f"{key}.heads = {self.heads} does not divide {key}.embed_dim = {self.embed_dim}; "
                f"allowed: a divisor of {self.embed_dim}, e.g. {_divisors(self.embed_dim)}"
            )


class CNNConfig(TrainConfig):
    label: ClassVar[str] = "CNN"
    arch: Literal["refcnn", "resnet18", "airbench94"] = "refcnn"
    weight_decay: NonNegativeFloat = 1e-4
    scheduler: Scheduler = "step"
    widths: Widths = [64, 128, 256, 512]  # refcnn
    convs_per_block: PositiveInt = 2  # refcnn
    hidden: PositiveInt = 256  # refcnn
    dropout: Probability = 0.5  # refcnn

    def architecture(self) -> str:
        return self.arch

    def layout(self) -> str:
        """The convolutional layout, comparable with `SSLConfig.layout` (the SSL report compares them)."""
        return self.arch if self.arch != "refcnn" else f"refcnn {self.widths}×{self.convs_per_block}"

    def check_images(self, key: str, height: int, width: int, dataset: str) -> None:
        if self.arch == "refcnn":
            _check_halvings(key, self.widths, height, width, dataset)
        if self.arch == "airbench94" and (height, width) != (32, 32):
            raise ValueError(
                f"{key}.arch = airbench94 is built for 32x32 images and {dataset}'s are {height}x{width}; "
                "use refcnn or resnet18"
            )


class SSLConfig(Section):
    """Self-supervised pre-training of an encoder (SimCLR, training/fit_simclr.py) on the classifier dataset's training
    images without their labels; the linear-probe stage measures it. Defaults: SimCLR's CIFAR-10 recipe
    with a small-batch optimiser (Adam) and R4's ResNet-18; `arch: refcnn` takes R3's CNN layout instead."""

    counterpart: ClassVar[str] = "cnn"  # the classifier family trained end to end on this encoder's layout (the report)
    method: Literal["simclr"] = "simclr"
    arch: Literal["resnet18", "refcnn"] = "resnet18"
    widths: Widths = [64, 128, 256, 512]  # refcnn
    convs_per_block: PositiveInt = 2  # refcnn
    epochs: PositiveInt = 100
    batch_size: Annotated[int, Field(ge=2), NotBool] = 256  # NT-Xent needs another image to contrast with
    temperature: PositiveFloat = 0.5
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-6
    proj_hidden: PositiveInt = 512
    proj_dim: PositiveInt = 128
    train_fraction: Fraction = 1.0  # of the training split (validation images excluded): the size study's knob
    crop_scale_min: Annotated[float, Field(gt=0, le=1), NotBool] = 0.2
    jitter: Annotated[float, Field(ge=0, lt=1), NotBool] = 0.4
    hue: Annotated[float, Field(ge=0, le=0.5), NotBool] = 0.1
    jitter_prob: Probability = 0.8
    grayscale_prob: Probability = 0.2
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def layout(self) -> str:
        """The encoder's convolutional layout, comparable with the counterpart's (`CNNConfig.layout`)."""
        return self.arch if self.arch != "refcnn" else f"refcnn {self.widths}×{self.convs_per_block}"

    def check_images(self, key: str, height: int, width: int, dataset: str) -> None:
        if self.arch == "refcnn":
            _check_halvings(key, self.widths, height, width, dataset)


class ProbeConfig(Section):
    """The linear probe of a frozen encoder: scikit-learn's logistic regression on standardised features,
    and a k-nearest-neighbour vote (cosine) beside it."""

    c: PositiveFloat = 1.0  # inverse L2 strength of the logistic regression
    max_iter: PositiveInt = 1000
    knn_k: PositiveInt = 20


class DistConfig(Section):
    """Data-parallel training of the classifiers (distributed.py): processes per node, and nodes.

    The world size changes the floats (gradients are summed in another order; on CPU each rank's
    BatchNorm sees only its share), so it is a param: DVC re-runs on a change and the resume
    fingerprint includes it. nproc > 1 starts the stage under `torchrun --standalone`; nnodes > 1
    is launched by torchrun's c10d rendezvous on every node (README "Team setup")."""

    nproc: PositiveInt = 1
    nnodes: PositiveInt = 1


class EvaluateConfig(Section):
    heatmap_images: PositiveInt = 8
    misclassified_images: PositiveInt = 32


class RegistryConfig(Section):
    # The registry alias `champion` moves to a run's better classifier only when its validation accuracy beats
    # the holder's on the same split by more than this (0.01: one point; 0: any gain, a tie keeps the holder)
    promote_margin: BelowOne = 0.0


class Params(Section):
    seed: NonNegativeInt = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # CPU threads of every computing stage. Float sums depend on it, so it is a param (DVC re-runs on a
    # change) rather than whatever the machine offers; "auto" takes torch's default, recorded per run.
    threads: Threads = 2
    # Deterministic kernels, or an error naming the op that has none (runtime.seed_everything); false
    # is the explicit, recorded opt-out for speed studies, never a default.
    deterministic: bool = True
    lr: PositiveFloat = 1e-3
    # The recipe these values started from (`reprovision recipe <name>` sets it): a label logged with every
    # stage's run, read by no computation; "none" is params.yaml as written.
    recipe: RecipeName = "none"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    judge: JudgeConfig = JudgeConfig()
    gan: GANConfig = GANConfig()
    vit: ViTConfig = ViTConfig()
    cnn: CNNConfig = CNNConfig()
    ssl: SSLConfig = SSLConfig()
    probe: ProbeConfig = ProbeConfig()
    dist: DistConfig = DistConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _check_geometry(self) -> Params:
        dataset = self.data.classifier_dataset
        _, height, width, _ = DATASET_SHAPES[dataset]
        for key in CLASSIFIERS:
            self.classifier(key).check_images(key, height, width, dataset)
        self.ssl.check_images("ssl", height, width, dataset)
        self._check_sizes()
        world = self.dist.nnodes * self.dist.nproc
        for key in CLASSIFIERS:
            section = self.classifier(key)
            if section.early_stop and self.data.val_fraction == 0:
                raise ValueError(
                    f"{key}.early_stop = {section.early_stop} decides on a validation split, and there is none: "
                    "set data.val_fraction > 0 (e.g. 0.1), or early_stop to 0"
                )
            if section.batch_size < 2 * world:
                raise ValueError(
                    f"{key}.batch_size = {section.batch_size} is split over dist.nnodes x dist.nproc = {world} "
                    f"processes, which leaves a process fewer than 2 images (BatchNorm needs 2); "
                    f"use {key}.batch_size >= {2 * world} or fewer processes"
                )
        return self

    def _check_sizes(self) -> None:
        """Every class has a validation image, and every GAN a batch of MNIST to train with.

        (The classifiers always have one: the stratified training subset keeps an image per class.)"""
        d = self.data
        train_n, test_n = DATASET_SIZES[d.classifier_dataset]
        classes = DATASET_SHAPES[d.classifier_dataset][3]
        subset = max(int(d.train_fraction * train_n), classes)
        val = int(round(d.val_fraction * subset))
        if d.val_fraction and val < classes:
            raise ValueError(
                f"data.val_fraction = {d.val_fraction} of {subset} training images holds out {val}, fewer than the "
                f"{classes} classes of {d.classifier_dataset}; raise data.val_fraction or "
                "data.train_fraction, or set it to 0"
            )
        mnist_train, mnist_test = DATASET_SIZES[self.data.gan_dataset]
        images = max(int(self.gan.train_fraction * mnist_train), 10)
        for key, batch in (("mlp", self.gan.mlp.batch_size), ("dcgan", self.gan.dcgan.batch_size)):
            if images < batch:
                raise ValueError(
                    f"gan.train_fraction = {self.gan.train_fraction} gives {images} MNIST images, fewer than one "
                    f"batch of gan.{key}.batch_size = {batch}; raise gan.train_fraction or lower the batch size"
                )
        # The final FID's floor compares N training with N test images (gan_metrics.gan_quality).
        floor = min(self.gan.fid_samples, mnist_test)
        if images < floor:
            raise ValueError(
                f"gan.train_fraction = {self.gan.train_fraction} gives {images} MNIST training images, fewer than the "
                f"gan.fid_samples = {floor} that the FID floor compares with as many test images; "
                f"raise gan.train_fraction to at least {floor / mnist_train:.4g} or lower gan.fid_samples"
            )

    def classifier(self, name: str) -> TrainConfig:
        """The section of classifier family `name` (one of `CLASSIFIERS`)."""
        if name not in CLASSIFIERS:
            raise KeyError(f"{name!r} is not a classifier family; the families: {', '.join(CLASSIFIERS)}")
        return getattr(self, name)

    def learning_rate(self, name: str) -> float:
        return self.lr * self.classifier(name).lr_mult

    def flat(self) -> dict[str, Any]:
        """`{"vit.lr_mult": 1.0, ...}`: the form MLflow params and study tables use."""
        return flatten(self.model_dump())

    def digest(self, *sections: str) -> str:
        """sha256 of the given sections (all when none): identifies a configuration."""
        dump = self.model_dump()
        picked = {k: dump[k] for k in sections} if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


# The classifier families, in params.yaml's order: every section of Params typed as a TrainConfig.
CLASSIFIERS: tuple[str, ...] = tuple(
    name
    for name, field in Params.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, TrainConfig)
)
CLASSIFIER_LABELS: dict[str, str] = {name: Params.model_fields[name].annotation.label for name in CLASSIFIERS}


def _divisors(n: int) -> str:
    """The small divisors of n, written "1, 2, 4 or 8"."""
    found = [str(d) for d in range(1, min(n, 16) + 1) if n % d == 0]
    return " or ".join([", ".join(found[:-1]), found[-1]]) if len(found) > 1 else found[0]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for "did you mean")."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _dotted(loc: tuple) -> str:
    """("gan", "mlp", "g_hidden", 1) -> "gan.mlp.g_hidden[1]": the key as params.yaml spells it."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def explain(error: ValidationError, source: str = "params.yaml") -> str:
    """One line per mistake: the dotted key, the value found, and what is allowed there."""
    lines = [f"{source}: {error.error_count()} invalid value(s):"]
    for err in error.errors():
        loc = tuple(err["loc"])
        key = _dotted(loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(Params, loc[:-1])
            known = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{_dotted((*loc[:-1], close[0]))}'?" if close else ""
            lines.append(f"  - unknown key '{key}'{hint} (allowed here: {', '.join(known)})")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":  # one of a list of names: the closest as a hint
            names = err["ctx"]["expected"].split("'")[1::2]  # "'a', 'b' or 'c'" -> a, b, c
            close = difflib.get_close_matches(str(err.get("input")), names, n=1)
            msg += f"; did you mean '{close[0]}'?" if close else ""
        if not loc:  # a check across keys (Params._check_geometry): its message names them
            lines.append(f"  - {msg}")
            continue
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        owner = _model_at(Params, loc) if err["type"] == "model_type" else None
        if owner:  # a section that is not a mapping, e.g. one whose keys are all commented out
            msg = f"should be a mapping with the keys {', '.join(owner.model_fields)}"
        lines.append(f"  - {key} = {shown}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of the sections {', '.join(Params.model_fields)}, "
            f"got {type(raw).__name__} {json.dumps(raw, default=str)[:80]}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain(err, source)) from None


def with_overrides(raw: dict[str, Any], sets: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """`raw` (params.yaml as read) with `key=value` overrides set in place, values read as YAML (as
    `dvc exp run -S` reads them); a malformed override or one into a non-section is a ConfigError."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: --set {item!r}: expected key=value, e.g. --set data.train_fraction=0.1")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: --set {key}: {'.'.join(parents)} is not a section of params.yaml")
        node[leaf] = yaml.safe_load(value)
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what it found and where, and the fix."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    opened = getattr(err, "context_mark", None)
    since = f" ({context} opened at line {opened.line + 1})" if context and opened is not None else ""
    return f"{problem}{where}{since}; fix that line (`key: value`, sections indented under their name)"


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run the stages from the repository root (where dvc.yaml is)")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    return parse_params(raw, str(path))
