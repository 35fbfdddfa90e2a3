"""The CUDA path, as far as a CPU can check it: determinism as an error with one clear line, the
attention kernel chosen on CUDA, the graph-captured step's warm-up that leaves no trace, which steps run
eagerly and why, benchmarks/gpu_check.py's option sets covering every recipe option that changes the
training step, and gpu_check end to end at smoke size (without MLflow or DVC importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reprovision.config import Params, TrainConfig
from reprovision.core import runtime
from reprovision.core.graphs import CapturedStep, capturable
from reprovision.models.classifiers import FAMILIES
from reprovision.training.fit_classifier import eager_reason
from reprovision.training.optim import SAM

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_an_op_without_a_deterministic_kernel_stops_the_run_naming_it_and_the_opt_out():
    index, values = torch.tensor([0, 0]), torch.tensor([1.0, 2.0])
    runtime.seed_everything(0, CPU)
    with pytest.raises(RuntimeError) as caught:  # an error, never a warning to scroll past
        torch.zeros(3).put_(index, values)
    explained = runtime.nondeterministic_op(caught.value)
    assert explained is not None and len(str(explained).splitlines()) == 1
    assert str(explained).startswith("put_ has no deterministic kernel") and "`deterministic: false`" in str(explained)
    assert runtime.nondeterministic_op(RuntimeError("CUDA out of memory")) is None
    runtime.seed_everything(0, CPU, deterministic=False)  # the explicit opt-out
    torch.zeros(3).put_(index, values)
    runtime.seed_everything(0, CPU)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def test_attention_kernel_is_chosen_on_cuda_and_left_to_torch_elsewhere():
    cuda = torch.device("cuda")
    assert runtime.attention_backend(cuda, torch.bfloat16) == "flash"
    assert runtime.attention_backend(cuda, None) == "efficient"  # flash takes no fp32
    assert runtime.attention_backend(CPU, torch.bfloat16) == "default"
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with runtime.attention_kernels(cuda, torch.bfloat16):  # only flags: no GPU needed to enter it
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_warm_up_before_capture_leaves_no_trace(name):
    """Capture needs a few real steps first; undone, the run goes on exactly as if they never ran."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3

    def run(warm_up_first: bool) -> list[torch.Tensor]:
        model = _net()
        opt = OPTIMIZERS[name](model.parameters())

        def step(xb, yb):
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return (loss.detach(),)

        torch.manual_seed(5)
        if warm_up_first:
            CapturedStep(step, [model], [opt]).warm_up([x, y])
        losses = [step(x, y)[0] for _ in range(4)]
        return losses + list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True))


def test_steps_a_graph_cannot_replay_are_refused_with_the_reason():
    model = _net()
    assert capturable([torch.optim.Adam(model.parameters(), fused=True)]) is None
    assert "not fused" in capturable([torch.optim.Adam(model.parameters())])
    assert "not Adam, AdamW or SGD" in capturable([SAM(torch.optim.SGD(model.parameters(), lr=0.1))])
    assert "dampening" in capturable(
        [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1, fused=True)]
    )
    with pytest.raises(ValueError, match="cannot capture this training step as a CUDA graph: Adam is not fused"):
        CapturedStep(lambda: (), [model], [torch.optim.Adam(model.parameters())])
    # What fit_classifier asks before it captures (only types and flags: no GPU needed), and gpu_check records.
    cuda, cfg = torch.device("cuda"), TrainConfig()
    fused = torch.optim.Adam(model.parameters(), fused=True)
    assert eager_reason(model, fused, cfg, cuda) is None
    assert eager_reason(model, SAM(fused), cfg, cuda) == "SAM's two passes per step"
    assert eager_reason(model, fused, cfg.model_copy(update={"compile": True}), cuda) == "torch.compile"
    assert eager_reason(model, fused, cfg, CPU) == "no CUDA graphs on cpu"
    assert eager_reason(model, SAM(fused), cfg, CPU) == "SAM's two passes per step"  # the recipe's reason first
    assert eager_reason(model, fused, cfg, cuda, cuda_graphs=False) == "cuda_graphs off"


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_gpu_check_option_sets_change_every_field_that_changes_the_training_step():
    """gpu_check compares graph against eager per option set: together the sets move every TrainConfig field
    off its reference value for some classifier, except those STEP_NEUTRAL says do not change the step (and
    why), and also MixUp, CutMix and the ViT's drop-path; each set is valid params and changes its recipe."""
    gpu_check = _gpu_check()
    reference = Params()
    changed: set[str] = set()
    for model in FAMILIES:
        sets = gpu_check.option_sets(model)
        assert sets, model
        for name, overrides in sets.items():
            params = gpu_check.apply(overrides, f"option set {name}")  # validated as params.yaml is
            moved = {
                field
                for field in type(params.classifier(model)).model_fields
                if getattr(params.classifier(model), field) != getattr(reference.classifier(model), field)
            }
            moved |= {
                f"augment.{k}" for k, v in params.augment.model_dump().items() if v != getattr(reference.augment, k)
            }
            assert moved, (model, name)  # a set that leaves the reference recipe as it is tests nothing
            changed |= moved
    neutral = set(gpu_check.STEP_NEUTRAL)
    assert neutral <= set(TrainConfig.model_fields), neutral - set(TrainConfig.model_fields)  # no stale entry
    assert not neutral & changed, neutral & changed  # neutral and varied at once: one of the two is wrong
    missing = set(TrainConfig.model_fields) - neutral - changed
    assert not missing, f"no option set in benchmarks/gpu_check.py varies {sorted(missing)}"
    assert {"drop_path", "augment.mixup_prob", "augment.cutmix_prob"} <= changed


def test_gpu_check_smoke_runs_end_to_end_without_mlflow_or_dvc(tmp_path, stage_mirror):
    """The GPU owner's check at smoke size on the CPU: every part runs and the JSON holds real figures."""
    blocker = tmp_path / "no-tracking"
    blocker.mkdir()
    # A None entry in sys.modules makes `import mlflow` (or dvc) raise ImportError, as on a GPU machine without them.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\nsys.modules['dvc'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT / "src")])}
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--data", str(stage_mirror), "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"vit", "cnn", "dcgan", "mlp"}
    for model, entry in report["models"].items():
        assert "error" not in entry, (model, entry)
        assert entry["determinism"]["repeat"] == "identical", (model, entry["determinism"])
        speed = entry["speed"]
        assert len(speed["epoch_seconds"]) == 3 and speed["images_per_s"] > 0 and speed["plain_images_per_s"] > 0
        assert speed["flops_per_image"] > 1e6 and speed["plain_ratio"] > 0
    assert report["full_runs"]["cnn"]["epochs"] == 2 and 0 <= report["full_runs"]["cnn"]["test_acc"] <= 1
    # Every option set ran for each classifier, with its weights' digest and attention kernel; on the CPU
    # there is no graph to compare, and SAM says why it would run eagerly on a GPU too.
    gpu_check = _gpu_check()
    for model in FAMILIES:
        assert len(report["models"][model]["determinism"]["weights_sha256"]) == 64
        assert report["models"][model]["determinism"]["attention_kernel"] == report["environment"]["attention_kernel"]
        sets = report["option_sets"][model]
        assert set(sets) == set(gpu_check.option_sets(model)), model
        for name, row in sets.items():
            assert "error" not in row and len(row["weights_sha256"]) == 64, (model, name, row)
            assert row["attention_kernel"] == "default" and row["graph_vs_eager"].startswith("n/a"), row
        digests = [row["weights_sha256"] for row in sets.values()]
        assert len(set(digests)) == len(digests), model  # each option changed what training ended with
        assert sets["fp32"]["precision"] == "fp32" and sets["grad_clip"]["step"] == "eager: no CUDA graphs on cpu"
        assert sets["sam"]["graph_vs_eager"] == "n/a (SAM's two passes per step)"
    assert "| model | batch | precision | s/epoch" in proc.stdout and "SMOKE" in proc.stdout
