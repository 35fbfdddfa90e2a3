"""Model cards: a short, honest description stored next to the weights and in MLflow."""

from __future__ import annotations

from reprovision.config import Params


def _table(metrics: dict) -> str:
    rows = [
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in metrics.items()
        if not isinstance(v, list)
    ]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def classifier_card(name: str, params: Params, metrics: dict, classes: list[str], arch: str) -> str:
    """`arch`: the family's sentence on its architecture (ClassifierFamily.describe)."""
    cfg = params.classifier(name)
    data = params.data
    return f"""# Model card: {name}

**Architecture.** {arch}; {metrics["params"]:,} parameters.

**Data.** {data.classifier_dataset} ({len(classes)} classes), train fraction {data.train_fraction}
(validation {data.val_fraction} of it held out), test fraction {data.test_fraction} (deterministic
class-stratified subsets, seed {params.seed}). Decisions read the validation split; the test split only reports.

**Training recipe.** {cfg.epochs} epochs, batch {cfg.batch_size}, optimiser {cfg.optimizer}
(lr {params.learning_rate(name):g} = lr {params.lr:g} x lr_mult {cfg.lr_mult:g}, weight decay {cfg.weight_decay:g}),
scheduler {cfg.scheduler}, label smoothing {cfg.label_smoothing:g}, gradient clipping {cfg.grad_clip:g},
SAM {cfg.sam} (rho {cfg.sam_rho:g}), augmentation {"on" if cfg.augment else "off"}, precision {cfg.precision}.

**Metrics** of the weights that ship, as training measured them. `monitor_test_*` are the training
stage's test figures under its precision (monitoring); the model's test accuracy is the evaluate
stage's (metrics/evaluate.json and the report), in fp32 as the logged model serves it.

{_table(metrics)}

**Intended use.** Comparing architectures and recipes on small natural-image benchmarks, reproducibly.
**Limits.** Trained from scratch on 32x32 images; not calibrated, not robust to distribution shift,
not for any decision about people. Accuracy on a fraction of the data is not comparable to full-data figures.
"""


def gan_card(name: str, params: Params, metrics: dict) -> str:
    g = params.gan
    cfg = getattr(g, name)
    arch = cfg.describe()
    return f"""# Model card: GAN {name}

**Architecture.** {arch}; G {metrics["g_params"]:,} / D {metrics["d_params"]:,} parameters.

**Data.** MNIST train fraction {g.train_fraction} (seed {params.seed}); images scaled to [-1, 1].

**Training recipe.** {g.epochs} epochs, batch {cfg.batch_size}, Adam lr G {cfg.lr_g:g} / D {cfg.lr_d:g},
betas ({cfg.beta1:g}, {cfg.beta2:g}), BCE on logits (non-saturating generator loss).

**Quality** (judged by the LeNet MNIST classifier, N = {metrics["n"]}):

{_table(metrics)}

**Intended use.** Studying GAN training and quality metrics on MNIST. **Limits.** Generates 28x28 digits only;
FID here is in LeNet feature space (not comparable to Inception FID) and depends on N.
"""


def judge_card(params: Params, metrics: dict) -> str:
    j = params.judge
    return f"""# Model card: judge (LeNet-style MNIST classifier)

**Purpose.** The instrument that measures GAN quality: its penultimate-layer features define the
Fréchet LeNet distance, its softmax the classifier Inception Score and the class coverage.
{metrics["params"]:,} parameters; {j.epochs} epochs of Adam lr {j.lr:g}, batch {j.batch_size}, \
train fraction {j.train_fraction}.

{_table(metrics)}

**Limits.** Only meaningful for 28x28 MNIST-like digits in [-1, 1].
"""
