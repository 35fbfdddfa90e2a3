"""params.yaml is checked before any compute: each mistake names the key, the bad value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import committed_params

from reprovision.config import ConfigError, Params, flatten, load_params, parse_params
from reprovision.core import track
from reprovision.core.runtime import resolve_device
from reprovision.data.datasets import DataError, mirror_from_env

ROOT = Path(__file__).resolve().parents[1]


def real_params() -> dict[str, Any]:
    return yaml.safe_load(committed_params())


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    assert last in node, f"{dotted} is not in params.yaml: the case would test nothing"
    node[last] = value
    return raw


def rename_key(raw: dict[str, Any], dotted: str, new_name: str) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[new_name] = node.pop(last)
    return raw


def config_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    return str(caught.value)


# (key to set, bad value, then the three things the message must say: the key, the value as shown, what is allowed)
BAD_VALUES = [
    pytest.param("vit.epochs", "ten", "vit.epochs", '"ten"', "valid integer", id="wrong-type-string-for-int"),
    pytest.param("vit.epochs", True, "vit.epochs", "true", "a number, not true/false", id="bool-for-int"),
    pytest.param("lr", True, "lr", "true", "a number, not true/false", id="bool-for-float"),
    pytest.param("lr", [0.001], "lr", "[0.001]", "valid number", id="list-for-float"),
    pytest.param("vit.epochs", 2.5, "vit.epochs", "2.5", "valid integer", id="fractional-epochs"),
    pytest.param("lr", -0.001, "lr", "-0.001", "greater than 0", id="negative-lr"),
    pytest.param("lr", 0, "lr", "0", "greater than 0", id="zero-lr"),
    pytest.param("gan.mlp.lr_d", -1e-4, "gan.mlp.lr_d", "-0.0001", "greater than 0", id="negative-gan-lr"),
    pytest.param("vit.batch_size", 0, "vit.batch_size", "0", "greater than 0", id="batch-size-0"),
    pytest.param(
        "data.train_fraction", 1.5, "data.train_fraction", "1.5", "less than or equal to 1", id="fraction-above-1"
    ),
    pytest.param("data.test_fraction", 0, "data.test_fraction", "0", "greater than 0", id="fraction-0"),
    pytest.param("gan.train_fraction", -0.5, "gan.train_fraction", "-0.5", "greater than 0", id="fraction-negative"),
    pytest.param(
        "augment.cutmix_prob", 1.5, "augment.cutmix_prob", "1.5", "less than or equal to 1", id="cutmix-prob-above-1"
    ),
    pytest.param("gan.dcgan.beta2", 1.0, "gan.dcgan.beta2", "1.0", "less than 1", id="adam-beta-1"),
    pytest.param("vit.epochs", 0, "vit.epochs", "0", "greater than 0", id="epochs-0"),
    pytest.param("gan.epochs", 0, "gan.epochs", "0", "greater than 0", id="gan-epochs-0"),
    pytest.param(
        "gan.mlp.g_hidden", [128, -1], "gan.mlp.g_hidden[1]", "-1", "greater than 0", id="negative-layer-width"
    ),
    pytest.param("vit.patch_size", 5, "vit.patch_size", "5", "a divisor of 32", id="patch-not-dividing-image"),
    pytest.param("vit.heads", 5, "vit.heads", "5", "a divisor of 192", id="embed-dim-not-divisible-by-heads"),
    pytest.param(
        "cnn.arch", "vgg16", "cnn.arch", '"vgg16"', "'refcnn', 'resnet18' or 'airbench94'", id="unknown-architecture"
    ),
    pytest.param(
        "vit.optimizer", "adagrad", "vit.optimizer", '"adagrad"', "'adam', 'adamw' or 'sgd'", id="unknown-optimiser"
    ),
    pytest.param(
        "cnn.scheduler",
        "linear",
        "cnn.scheduler",
        '"linear"',
        "'none', 'cosine', 'step', 'warmup_cosine' or 'warmup_linear'",
        id="unknown-scheduler",
    ),
    pytest.param(
        "vit.precision", "fp16", "vit.precision", '"fp16"', "'auto', 'fp32' or 'bf16'", id="unknown-precision"
    ),
    pytest.param("device", "tpu", "device", '"tpu"', "'auto', 'cpu', 'cuda' or 'mps'", id="unknown-device"),
    pytest.param(
        "data.classifier_dataset",
        "imagenet",
        "data.classifier_dataset",
        '"imagenet"',
        "'cifar10' or 'cifar100'",
        id="unknown-dataset",
    ),
    pytest.param(
        "vit", [1, 2], "vit", "[1, 2]", "a mapping with the keys epochs, batch_size", id="section-not-a-mapping"
    ),
    pytest.param("augment", None, "augment", "null", "a mapping with the keys crop_padding", id="section-emptied"),
    # Values that used to pass here and fail later with a traceback (after the GAN had trained).
    pytest.param("gan.fid_samples", 1, "gan.fid_samples", "1", "greater than or equal to 2", id="fid-of-one-image"),
    pytest.param(
        "gan.fid_samples_during",
        0,
        "gan.fid_samples_during",
        "0",
        "greater than or equal to 2",
        id="fid-during-of-none",
    ),
    pytest.param("cnn.widths", [], "cnn.widths", "[]", "at least 1 item", id="cnn-without-blocks"),
    pytest.param("gan.mlp.g_hidden", [], "gan.mlp.g_hidden", "[]", "at least 1 item", id="generator-without-layers"),
    pytest.param("threads", 0, "threads", "0", "greater than 0, or 'auto'", id="zero-threads"),
    pytest.param("threads", "many", "threads", '"many"', "'auto'", id="threads-not-a-number"),
    pytest.param("data.val_fraction", 1.0, "data.val_fraction", "1.0", "less than 1", id="validation-takes-everything"),
]

# Values that are fine alone but not together with the data sizes: the message names the fix.
CROSS_CHECKS = [
    pytest.param(
        {"data.train_fraction": 0.001, "data.val_fraction": 0.1},
        "data.val_fraction = 0.1 of 50 training images holds out 5",
        id="val-smaller-than-classes",
    ),
    pytest.param(
        {"gan.train_fraction": 0.0001}, "fewer than one batch of gan.mlp.batch_size = 64", id="gan-data-below-one-batch"
    ),
    pytest.param(
        {"gan.train_fraction": 0.002, "gan.fid_samples": 200},
        "gives 120 MNIST training images, fewer than the gan.fid_samples = 200",
        id="gan-data-below-the-fid-floor",
    ),
    pytest.param({"cnn.widths": [8, 8, 8, 8, 8, 8]}, "use at most 5 widths", id="cnn-deeper-than-the-image"),
]


@pytest.mark.parametrize("values, expected", CROSS_CHECKS)
def test_values_checked_against_the_data_sizes(values, expected):
    raw = real_params()
    for key, value in values.items():
        set_key(raw, key, value)
    assert expected in config_error(raw)


@pytest.mark.parametrize("key, value, named_key, shown_value, allowed", BAD_VALUES)
def test_bad_value_is_named_with_what_is_allowed(key, value, named_key, shown_value, allowed):
    message = config_error(set_key(real_params(), key, value))
    assert "1 invalid value(s)" in message  # the edit made exactly one mistake
    line = message.splitlines()[1]
    assert named_key in line and shown_value in line and allowed in line, message


TYPOS = [  # (key as in params.yaml, the typo, the suggestion the message must make)
    pytest.param("vit.epochs", "epoch", "vit.epochs", id="nested-typo"),
    pytest.param("lr", "lrr", "lr", id="top-level-typo"),
    pytest.param("gan.dcgan.init_std", "init_sd", "gan.dcgan.init_std", id="deeply-nested-typo"),
    pytest.param("augment", "augmentation", "augment", id="section-typo"),
]


@pytest.mark.parametrize("key, typo, suggestion", TYPOS)
def test_unknown_key_suggests_the_real_one(key, typo, suggestion):
    message = config_error(rename_key(real_params(), key, typo))
    typo_key = ".".join([*key.split(".")[:-1], typo])
    assert f"unknown key '{typo_key}'" in message, message
    assert f"did you mean '{suggestion}'?" in message, message
    assert "allowed here: " in message and suggestion.split(".")[-1] in message.split("allowed here: ")[1]


def test_every_mistake_is_reported_at_once():
    raw = set_key(set_key(real_params(), "lr", -1), "cnn.arch", "vgg16")
    message = config_error(rename_key(raw, "vit.heads", "head"))
    assert "3 invalid value(s)" in message
    assert all(part in message for part in ("lr = -1", 'cnn.arch = "vgg16"', "did you mean 'vit.heads'?")), message


def test_top_level_not_a_mapping():
    with pytest.raises(
        ConfigError,
        match=r"expected a mapping of the sections seed, device, threads, deterministic, lr, recipe, data.*got list "
        r"\[1, 2\]",
    ):
        parse_params([1, 2])


def test_yaml_floats_without_a_dot_still_parse():
    # PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3": the schema must still take it as a number.
    assert parse_params(yaml.safe_load("lr: 1e-3")).lr == 0.001


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("vit:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML"):
        load_params(path)


def test_missing_params_yaml_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml not found: run the stages from the repository root"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_is_exactly_the_schema_defaults(tmp_path):
    # As committed: `make run` / `dvc exp run -S` leave their overrides in the working copy.
    (tmp_path / "params.yaml").write_text(committed_params())
    assert load_params(tmp_path / "params.yaml") == Params()


def test_params_yaml_writes_out_every_key():
    # No hidden defaults: every knob the code reads is visible (and tracked by DVC) in params.yaml.
    hidden = sorted(set(Params().flat()) - set(flatten(real_params())))
    assert not hidden, f"params.yaml leaves out {hidden}: write them there with their defaults"


def test_absent_device_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert all(part in message for part in ("device = 'cuda'", "found: cpu", "`device: auto` or `device: cpu`")), (
        message
    )
    assert resolve_device("cpu") == torch.device("cpu")


def test_missing_data_mirror_names_the_path(monkeypatch, tmp_path):
    nowhere = tmp_path / "no-such-mirror"
    monkeypatch.setenv("REPROVISION_DATA_MIRROR", str(nowhere))
    with pytest.raises(DataError, match=rf"REPROVISION_DATA_MIRROR={nowhere} is not an existing directory"):
        mirror_from_env()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("REPROVISION_DATA_MIRROR", str(tmp_path / "a-file"))
    with pytest.raises(DataError, match="is not an existing directory"):
        mirror_from_env()
    monkeypatch.setenv("REPROVISION_DATA_MIRROR", str(tmp_path))
    assert mirror_from_env() == tmp_path


def test_stage_stops_on_bad_params_before_any_compute(tmp_path):
    # The tracking store is unwritable and the data absent: both checks would fail too, so an error
    # about params proves that params (and the device) are checked first.
    store = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}"
    with pytest.raises(track.TrackingError):
        track.check_store(store)
    env = {k: v for k, v in os.environ.items() if k != "REPROVISION_DATA_MIRROR"}
    env |= {"MLFLOW_TRACKING_URI": store, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cases = {
        ("vit.heads", 5): "vit.heads = 5 does not divide vit.embed_dim = 192",
        ("device", "cuda"): "device = 'cuda', but no cuda device is available",
    }
    runs = {}
    for (key, value), expected in cases.items():  # both at once: each start imports torch
        run_dir = tmp_path / key
        run_dir.mkdir()
        (run_dir / "params.yaml").write_text(yaml.safe_dump(set_key(real_params(), key, value)))
        stage = subprocess.Popen(
            [sys.executable, str(ROOT / "stages" / "train_vit.py")],
            cwd=run_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[run_dir] = expected, stage

    for run_dir, (expected, proc) in runs.items():
        stderr = proc.communicate()[1]
        assert proc.returncode == 2, stderr
        assert stderr.startswith("error: ") and expected in stderr, stderr
        assert "Traceback" not in stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["params.yaml"]  # no models/, metrics/, mlflow.db
    assert not (tmp_path / "no-such-folder").exists()


def test_under_dvc_a_stopped_stage_says_that_dvc_checkout_restores_its_outputs(tmp_path, monkeypatch):
    from reprovision.core.stage import restore_hint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert restore_hint() == ""  # run by hand: DVC removed nothing
    monkeypatch.setenv("DVC_STAGE", "check-params")
    assert restore_hint() == ""  # its output persists (dvc.yaml), so that a refusal leaves it
    monkeypatch.setenv("DVC_STAGE", "train-gan@dcgan")
    assert restore_hint() == (
        " DVC removed train-gan@dcgan's outputs before running it: "
        "`dvc checkout train-gan@dcgan` restores the last ones."
    )
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    assert restore_hint() == ""  # a queued experiment's copy: the workspace lost nothing


@pytest.mark.parametrize(
    "key, text",
    [
        ("lr", ".inf"),
        ("vit.lr_mult", ".inf"),
        ("cnn.weight_decay", ".inf"),
        ("gan.mlp.lr_g", ".nan"),
        ("augment.mixup_alpha", "-.inf"),
    ],
)
def test_an_infinite_or_nan_float_is_a_config_error(key, text):
    """`-S lr=inf` writes `lr: .inf` to params.yaml: it must stop at the check, not train into NaN."""
    value = yaml.safe_load(f"v: {text}")["v"]
    message = config_error(set_key(real_params(), key, value))
    assert f"{key} = " in message and "finite number" in message, message
