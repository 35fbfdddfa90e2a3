"""The fetch-data logic on tiny files generated in each official format, then on the real mirror."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import require_mirror

from reprovision.data import datasets as data
from reprovision.data.datasets import DataError

SIZES = {"train": 12, "test": 6}  # CIFAR-10: per batch file
CIFAR100_NAMES = [f"class_{i:02d}" for i in range(100)]


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def random_split(rng: np.random.Generator, n: int, shape: tuple[int, ...], classes: int):
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = np.arange(n) % classes  # every class present, in a scrambled order
    return x, rng.permutation(y).astype(np.int64)


def empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ------------------------------------------------------------------------------ generated mirrors


def make_mnist(mirror: Path, monkeypatch) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = mirror / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays, table = {}, {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = random_split(rng, SIZES[split], (28, 28), 10)
        images = np.array([0x803, len(x), 28, 28], ">i4").tobytes() + x.tobytes()
        labels = np.array([0x801, len(y)], ">i4").tobytes() + y.astype(np.uint8).tobytes()
        for name, content in ((f"{prefix}-images-idx3-ubyte.gz", images), (f"{prefix}-labels-idx1-ubyte.gz", labels)):
            packed = gzip.compress(content, mtime=0)
            (raw / name).write_bytes(packed)
            table[name] = md5(packed)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x[:, None], y
    monkeypatch.setattr(data, "MNIST_MD5", table)
    return arrays


def make_cifar10(mirror: Path, monkeypatch, xz: bool, meta: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = mirror / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    arrays, table = {}, {}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        xs, ys = [], []
        for name in names:
            x, y = random_split(rng, SIZES[split], (3, 32, 32), 10)
            content = np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(x), -1)], axis=1).tobytes()
            table[name] = md5(content)
            if xz:
                (folder / f"{name}.xz").write_bytes(lzma.compress(content))
            else:
                (folder / name).write_bytes(content)
            xs.append(x)
            ys.append(y)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    if meta:
        (folder / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASSES) + "\n\n")
    monkeypatch.setattr(data, "CIFAR10_BINARY_MD5", table)
    return arrays


def make_cifar100(mirror: Path, monkeypatch, layout: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    folder = mirror / "cifar100" / f"cifar-100-{layout}"
    folder.mkdir(parents=True)
    arrays, table = {}, {}
    for split, n in (("train", 200), ("test", 100)):
        x, y = random_split(rng, n, (3, 32, 32), 100)
        coarse = y // 5
        if layout == "python":
            entry = {"data": x.reshape(n, -1), "fine_labels": y.tolist(), "coarse_labels": coarse.tolist()}
            content = pickle.dumps(entry)
        else:
            labels = np.stack([coarse, y], axis=1).astype(np.uint8)
            content = np.concatenate([labels, x.reshape(n, -1)], axis=1).tobytes()
        name = split if layout == "python" else f"{split}.bin"
        (folder / name).write_bytes(content)
        table[name] = md5(content)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    if layout == "python":
        meta = pickle.dumps({"fine_label_names": CIFAR100_NAMES, "coarse_label_names": [str(i) for i in range(20)]})
        (folder / "meta").write_bytes(meta)
        table["meta"] = md5(meta)
        monkeypatch.setattr(data, "CIFAR100_PYTHON_MD5", table)
    else:
        (folder / "fine_label_names.txt").write_text("\n".join(CIFAR100_NAMES) + "\n")
        monkeypatch.setattr(data, "CIFAR100_BINARY_MD5", table)
    return arrays


def assert_fetched(out: Path, name: str, entry: dict, arrays: dict[str, np.ndarray], classes: list[str]):
    folder = out / name
    for key, expected in arrays.items():
        saved = np.load(folder / f"{key}.npy", allow_pickle=False)
        assert saved.dtype == (np.uint8 if key.endswith("_x") else np.int64)
        np.testing.assert_array_equal(saved, expected)
    assert json.loads((folder / "classes.json").read_text()) == classes
    assert entry["train"] == len(arrays["train_y"]) and entry["test"] == len(arrays["test_y"])
    assert entry["classes"] == classes
    assert sorted(entry["files"]) == sorted(p.name for p in folder.iterdir())
    for file_name, digest in entry["files"].items():
        assert hashlib.sha256((folder / file_name).read_bytes()).hexdigest() == digest
    assert len(entry["sha256"]) == 64


# ------------------------------------------------------------------------------ mirror: each format


def test_mnist_from_mirror(tmp_path, monkeypatch):
    arrays = make_mnist(tmp_path / "mirror", monkeypatch)
    entry = data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    assert entry["source"] == "mirror"
    assert_fetched(tmp_path / "out", "mnist", entry, arrays, [str(d) for d in range(10)])


@pytest.mark.parametrize("xz", [False, True], ids=["bin", "bin.xz"])
def test_cifar10_from_mirror(tmp_path, monkeypatch, xz):
    arrays = make_cifar10(tmp_path / "mirror", monkeypatch, xz=xz)
    entry = data.fetch_dataset("cifar10", tmp_path / "out", tmp_path / "mirror")
    assert_fetched(tmp_path / "out", "cifar10", entry, arrays, data.CIFAR10_CLASSES)


def test_cifar10_class_names_come_from_batches_meta_txt(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=False)
    names = [f"thing{i}" for i in range(10)]
    (tmp_path / "mirror/cifar10/cifar-10-batches-bin/batches.meta.txt").write_text("\n".join(names))
    assert data.fetch_dataset("cifar10", tmp_path / "out", tmp_path / "mirror")["classes"] == names


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_cifar100_from_mirror(tmp_path, monkeypatch, layout):
    arrays = make_cifar100(tmp_path / "mirror", monkeypatch, layout)
    entry = data.fetch_dataset("cifar100", tmp_path / "out", tmp_path / "mirror")
    assert_fetched(tmp_path / "out", "cifar100", entry, arrays, CIFAR100_NAMES)


def test_fetch_all_writes_manifest_and_load_split_reads_it_back(tmp_path, monkeypatch):
    mnist = make_mnist(tmp_path / "mirror", monkeypatch)
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    manifest = data.fetch_all(["mnist", "cifar10"], tmp_path / "out", tmp_path / "mirror")
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest
    assert list(manifest) == ["mnist", "cifar10"]
    assert data.data_sha256(tmp_path / "out", "mnist") == manifest["mnist"]["sha256"]
    assert manifest["mnist"]["sha256"] != manifest["cifar10"]["sha256"]
    split = data.load_split(tmp_path / "out", "mnist", "test")
    np.testing.assert_array_equal(split.x, mnist["test_x"])
    np.testing.assert_array_equal(split.y, mnist["test_y"])
    assert split.x.shape == (SIZES["test"], 1, 28, 28) and split.classes == [str(d) for d in range(10)]


def test_refetch_gives_identical_files(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=False)
    first = data.fetch_dataset("cifar10", tmp_path / "a", tmp_path / "mirror")
    again = data.fetch_dataset("cifar10", tmp_path / "a", tmp_path / "mirror")  # replaces the existing copy
    assert first == again
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cifar10"]  # no temp folders left over


# ------------------------------------------------------------------------------ download: same bytes


def fake_torchvision_class(arrays: dict[str, np.ndarray], classes: list[str], nhwc: bool):
    class FakeDataset:  # what torchvision.datasets.{MNIST,CIFAR10,CIFAR100} expose after download=True
        def __init__(self, root, train, download):
            assert download and Path(root).is_dir()
            split = "train" if train else "test"
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if nhwc:  # CIFAR: numpy NHWC images, a list of int targets
                self.data, self.targets = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y.tolist()
            else:  # MNIST: uint8 tensor (N, H, W), int64 tensor targets
                self.data, self.targets = torch.from_numpy(x[:, 0].copy()), torch.from_numpy(y)
            self.classes = classes

    return FakeDataset


@pytest.mark.parametrize(
    ("name", "make", "torchvision_name", "classes"),
    [
        ("mnist", lambda m, mp: make_mnist(m, mp), "MNIST", ["0 - zero"] * 10),  # torchvision's names are not used
        ("cifar10", lambda m, mp: make_cifar10(m, mp, xz=True), "CIFAR10", data.CIFAR10_CLASSES),
        ("cifar100", lambda m, mp: make_cifar100(m, mp, "binary"), "CIFAR100", CIFAR100_NAMES),
    ],
)
def test_download_and_mirror_give_byte_identical_files(tmp_path, monkeypatch, name, make, torchvision_name, classes):
    arrays = make(tmp_path / "mirror", monkeypatch)
    fake = fake_torchvision_class(arrays, classes, nhwc=name != "mnist")
    monkeypatch.setattr(data._torchvision_datasets(), torchvision_name, fake)
    from_mirror = data.fetch_dataset(name, tmp_path / "m", tmp_path / "mirror")
    downloaded = data.fetch_dataset(name, tmp_path / "d", None)
    assert (from_mirror["source"], downloaded["source"]) == ("mirror", "download")
    assert downloaded["files"] == from_mirror["files"]
    assert downloaded["sha256"] == from_mirror["sha256"]


def test_download_failure_without_mirror_says_how_to_set_one(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data._torchvision_datasets(), "CIFAR10", Offline)
    with pytest.raises(DataError, match=r"could not download cifar10 .*name resolution.*REPROVISION_DATA_MIRROR="):
        data.fetch_all(["cifar10"], tmp_path / "out", None)
    assert empty(tmp_path / "out")


# ------------------------------------------------------------------------------ bad input


def test_checksum_mismatch_names_file_and_both_md5s(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    path = tmp_path / "mirror/mnist/MNIST/raw/t10k-labels-idx1-ubyte.gz"
    expected = data.MNIST_MD5[path.name]
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(content))
    with pytest.raises(DataError) as err:
        data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    assert str(path) in str(err.value) and expected in str(err.value)
    assert md5(path.read_bytes()) in str(err.value) and "re-download" in str(err.value)
    assert empty(tmp_path / "out")


def test_decompressed_checksum_mismatch(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    monkeypatch.setitem(data.CIFAR10_BINARY_MD5, "test_batch.bin", "0" * 32)
    with pytest.raises(DataError, match=r"test_batch\.bin\.xz: md5 of the decompressed data is .* expected 0{32}"):
        data.fetch_dataset("cifar10", tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def truncate(path: Path) -> str:
    """Cut `path` in half; returns the md5 of what is left, so the checksum check lets it through."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return md5(path.read_bytes())


def test_truncated_gz(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    path = tmp_path / "mirror/mnist/MNIST/raw/train-images-idx3-ubyte.gz"
    monkeypatch.setitem(data.MNIST_MD5, path.name, truncate(path))
    with pytest.raises(DataError, match=rf"{path}.*truncated or corrupt"):
        data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def test_truncated_xz(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    path = tmp_path / "mirror/cifar10/cifar-10-batches-bin/data_batch_3.bin.xz"
    truncate(path)  # the md5 is of the decompressed data, so lzma itself must notice
    with pytest.raises(DataError, match=rf"{path}.*truncated or corrupt"):
        data.fetch_dataset("cifar10", tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def test_wrong_idx_magic(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    path = tmp_path / "mirror/mnist/MNIST/raw/t10k-images-idx3-ubyte.gz"
    packed = gzip.compress(np.array([0x801, 3], ">i4").tobytes() + bytes(3), mtime=0)  # a label file
    path.write_bytes(packed)
    monkeypatch.setitem(data.MNIST_MD5, path.name, md5(packed))
    with pytest.raises(DataError, match=rf"{path} is not the expected idx file: magic 0x801"):
        data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def test_cifar_record_size_not_a_multiple(tmp_path, monkeypatch):
    make_cifar100(tmp_path / "mirror", monkeypatch, "binary")
    path = tmp_path / "mirror/cifar100/cifar-100-binary/test.bin"
    path.write_bytes(path.read_bytes() + b"\0")
    monkeypatch.setitem(data.CIFAR100_BINARY_MD5, path.name, md5(path.read_bytes()))
    with pytest.raises(DataError, match=rf"{path} has \d+ bytes, not a multiple of the 3074-byte"):
        data.fetch_dataset("cifar100", tmp_path / "out", tmp_path / "mirror")


def test_cifar100_binary_without_checksum_checks_label_ranges(tmp_path, monkeypatch):
    make_cifar100(tmp_path / "mirror", monkeypatch, "binary")
    monkeypatch.setattr(data, "CIFAR100_BINARY_MD5", {})  # the default: no published md5 to check
    path = tmp_path / "mirror/cifar100/cifar-100-binary/train.bin"
    content = bytearray(path.read_bytes())
    content[1] = 200  # the first record's fine label
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=rf"{path}: labels out of range"):
        data.fetch_dataset("cifar100", tmp_path / "out", tmp_path / "mirror")


def test_missing_file_names_expected_path_and_fix(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    (tmp_path / "mirror/cifar10/cifar-10-batches-bin/data_batch_4.bin.xz").unlink()
    with pytest.raises(DataError, match=r"data_batch_4\.bin\.xz not found in the data mirror .*unset REPROVISION"):
        data.fetch_dataset("cifar10", tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def test_dataset_absent_from_mirror(tmp_path):
    (tmp_path / "mirror").mkdir()
    with pytest.raises(DataError, match=r"cifar-100-python/train not found .*cifar-100-binary"):
        data.fetch_all(["cifar100"], tmp_path / "out", tmp_path / "mirror")
    assert empty(tmp_path / "out")


def test_failed_fetch_keeps_existing_good_output(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    good = data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    truncate(tmp_path / "mirror/mnist/MNIST/raw/train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: md5 is"):
        data.fetch_dataset("mnist", tmp_path / "out", tmp_path / "mirror")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mnist"]
    for file_name, digest in good["files"].items():
        assert hashlib.sha256((tmp_path / "out/mnist" / file_name).read_bytes()).hexdigest() == digest


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'cifar1O'; allowed: mnist, cifar10, cifar100"):
        data.fetch_all(["mnist", "cifar1O"], tmp_path / "out", None)
    with pytest.raises(DataError, match="unknown split 'val'"):
        data.load_split(tmp_path, "mnist", "val")


def test_missing_fetched_data_says_run_fetch(tmp_path):
    with pytest.raises(DataError, match=r"train_x\.npy not found: run the fetch-data stage"):
        data.load_split(tmp_path, "cifar10", "train")
    with pytest.raises(DataError, match=r"manifest\.json not found: run the fetch-data stage"):
        data.data_sha256(tmp_path, "cifar10")


def test_mirror_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    assert data.mirror_from_env() is None
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path))
    assert data.mirror_from_env() == tmp_path
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=rf"REPROVISION_DATA_MIRROR={tmp_path / 'nowhere'} is not an existing dir"):
        data.mirror_from_env()


# ------------------------------------------------------------------------------ availability (check-params)


def test_availability_sees_exactly_the_files_each_mirror_reader_reads(tmp_path, monkeypatch):
    """in_mirror says yes for each layout a reader takes, and no once any file the reader needs is gone."""
    mirrors = {
        ("mnist", ""): make_mnist,
        ("cifar10", "bin"): lambda m, mp: make_cifar10(m, mp, xz=False, meta=False),
        ("cifar10", "bin.xz"): lambda m, mp: make_cifar10(m, mp, xz=True, meta=False),
        ("cifar100", "python"): lambda m, mp: make_cifar100(m, mp, "python"),
        ("cifar100", "binary"): lambda m, mp: make_cifar100(m, mp, "binary"),
    }
    for (name, layout), make in mirrors.items():
        mirror = tmp_path / f"{name}-{layout}"
        make(mirror, monkeypatch)
        assert data.in_mirror(name, mirror) and data.fetch_dataset(name, tmp_path / "out", mirror)
        assert [other for other in data.DATASET_SHAPES if data.in_mirror(other, mirror)] == [name]
        for path in sorted(p for p in mirror.rglob("*") if p.is_file()):
            content = path.read_bytes()
            path.unlink()
            needed = True
            try:
                data.fetch_dataset(name, tmp_path / "out", mirror)
                needed = False
            except DataError:
                pass
            assert data.in_mirror(name, mirror) is not needed, (path, needed)  # it needs what the reader needs
            path.write_bytes(content)


def test_a_dataset_found_nowhere_names_every_place_looked_and_what_to_set(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    selected = {"data.classifier_dataset": "cifar100", "data.gan_dataset": "mnist"}
    with pytest.raises(DataError) as caught:
        data.check_available(selected, tmp_path / "prepared", tmp_path / "mirror")
    message = str(caught.value)
    for part in (
        "data.classifier_dataset = cifar100 is in neither",
        f"{tmp_path / 'prepared' / 'cifar100'} (no prepared copy)",
        f"nor the data mirror {tmp_path / 'mirror'} (REPROVISION_DATA_MIRROR, expected as <mirror>/cifar100/",
        "with a mirror set fetch-data does not download",
        "unset REPROVISION_DATA_MIRROR to download it",
        "or set data.classifier_dataset to one the mirror holds (cifar10)",
        "Nothing was fetched or removed.",
    ):
        assert part in message, (part, message)
    assert "mnist" not in message.replace(str(tmp_path), "")  # the one that is there is not named
    assert not (tmp_path / "prepared").exists()


def test_a_prepared_copy_or_a_download_counts_as_available(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", monkeypatch)
    make_cifar100(tmp_path / "elsewhere", monkeypatch, "python")
    data.fetch_all(["cifar100"], tmp_path / "prepared", tmp_path / "elsewhere")  # prepared online, say
    selected = {"data.classifier_dataset": "cifar100", "data.gan_dataset": "mnist"}
    assert data.check_available(selected, tmp_path / "prepared", tmp_path / "mirror") == {
        "cifar100": f"already in {tmp_path / 'prepared' / 'cifar100'}",
        "mnist": f"mirror {tmp_path / 'mirror'}",
    }
    (tmp_path / "prepared" / "cifar100" / "test_y.npy").unlink()  # a copy cut short is no copy
    with pytest.raises(DataError, match="cifar100 is in neither"):
        data.check_available(selected, tmp_path / "prepared", tmp_path / "mirror")
    # No mirror set: fetch-data downloads, which the check does not try (it never downloads).
    assert data.check_available(selected, tmp_path / "prepared", None) == {
        "cifar100": "download (no mirror set)",
        "mnist": "download (no mirror set)",
    }


CHECK_PARAMS = """
import sys
sys.path[:0] = [{stages!r}]
import check_params
from reprovision.data.datasets import DataError
try:
    check_params.check_params()
except DataError as err:
    print("refused:", err)
print("imported:", sorted(m for m in ("torch", "torchvision", "mlflow") if m in sys.modules))
"""


def test_check_params_refuses_a_dataset_it_cannot_get_and_leaves_the_data_untouched(tmp_path, monkeypatch):
    """The stage's own check (without torch or MLflow): offline, CIFAR-100 in no mirror and not prepared."""
    import subprocess
    import sys

    from conftest import ROOT, committed_params

    make_mnist(tmp_path / "mirror", monkeypatch)
    make_cifar10(tmp_path / "mirror", monkeypatch, xz=True)
    work = tmp_path / "work"
    data.fetch_all(["cifar10", "mnist"], work / "data" / "prepared", tmp_path / "mirror")
    before = {p: p.read_bytes() for p in (work / "data").rglob("*") if p.is_file()}
    env = {**os.environ, data.MIRROR_ENV: str(tmp_path / "mirror")}
    script = CHECK_PARAMS.format(stages=str(ROOT / "stages"))
    checked = work / "data" / "params-checked.txt"
    for dataset, refused in (("cifar100", True), ("cifar10", False)):
        (work / "params.yaml").write_text(
            committed_params().replace("classifier_dataset: cifar10", f"classifier_dataset: {dataset}")
        )
        out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True).stdout
        assert ("refused: data.classifier_dataset = cifar100 is in neither data/prepared/cifar100" in out) is refused, (
            out
        )
        assert "imported: []" in out, out  # the check stays light: no torch, no MLflow
        assert checked.exists() is not refused
    assert {
        p: p.read_bytes() for p in (work / "data").rglob("*") if p.is_file() and p.name != "params-checked.txt"
    } == before


# ------------------------------------------------------------------------------ stratified subsets


def test_stratified_subset_keeps_class_proportions_and_is_deterministic():
    y = np.repeat(np.arange(3), [100, 200, 300])
    np.random.default_rng(0).shuffle(y)
    picked = data.stratified_subset(y, 0.1, seed=0)
    assert picked.dtype == np.int64 and np.all(np.diff(picked) > 0)
    assert np.bincount(y[picked]).tolist() == [10, 20, 30]
    np.testing.assert_array_equal(picked, data.stratified_subset(y, 0.1, seed=0))
    assert not np.array_equal(picked, data.stratified_subset(y, 0.1, seed=1))


def test_stratified_subset_edges():
    y = np.repeat(np.arange(10), 50)
    np.testing.assert_array_equal(data.stratified_subset(y, 1.0, seed=0), np.arange(500))
    tiny = data.stratified_subset(y, 0.001, seed=0)  # 0.5 images: still one of each class
    assert sorted(y[tiny].tolist()) == list(range(10))
    with pytest.raises(DataError, match="outside"):
        data.stratified_subset(y, 0.0, seed=0)


# ------------------------------------------------------------------------------ the real mirror


def test_real_mnist(tmp_path):
    entry = data.fetch_dataset("mnist", tmp_path, require_mirror())
    assert (entry["train"], entry["test"]) == (60000, 10000)
    train = data.load_split(tmp_path, "mnist", "train")
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == np.uint8
    assert train.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test = data.load_split(tmp_path, "mnist", "test")
    assert np.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow  # ~11 s of CPU (xz-decompressing 180 MB); over 20 s wall on a busy 2-core machine
def test_real_cifar10(tmp_path):
    entry = data.fetch_dataset("cifar10", tmp_path, require_mirror())
    assert (entry["train"], entry["test"]) == (50000, 10000)
    assert entry["classes"] == data.CIFAR10_CLASSES
    train = data.load_split(tmp_path, "cifar10", "train")
    assert train.x.shape == (50000, 3, 32, 32)
    assert np.bincount(train.y).tolist() == [5000] * 10
    assert np.bincount(data.load_split(tmp_path, "cifar10", "test").y).tolist() == [1000] * 10


@pytest.mark.slow
def test_the_lossy_jpeg_cifar10_is_read_only_when_asked_and_says_so(tmp_path, stage_mirror):
    """What a benchmark carries to a lent GPU: the JPEG copy, md5-checked, images in the official order
    class by class, within JPEG's error of the lossless batches; the pipeline never takes it."""
    (tmp_path / data.CIFAR10_JPEG).parent.mkdir(parents=True)
    (tmp_path / data.CIFAR10_JPEG).symlink_to(require_mirror() / data.CIFAR10_JPEG)
    with pytest.raises(DataError, match="cifar-10-batches-bin"):
        data.read_mirror("cifar10", tmp_path)
    lossy, source = data.read_mirror("cifar10", tmp_path, lossy_ok=True)
    assert "LOSSY" in source and lossy["train_x"].shape == (50000, 3, 32, 32)
    assert np.bincount(lossy["test_y"]).tolist() == [1000] * 10
    exact, source = data.read_mirror("cifar10", stage_mirror, lossy_ok=True)
    assert "lossless" in source
    for k in range(10):  # the k-th class's images, in their official order
        jpeg = lossy["test_x"][lossy["test_y"] == k].astype(np.float32)
        true = exact["test_x"][exact["test_y"] == k].astype(np.float32)
        assert np.abs(jpeg - true).mean(axis=(1, 2, 3)).max() < 16  # SOURCES.md: at most 15.5/255 per image


def test_checksum_tables_equal_torchvisions_published_values():
    tv = data._torchvision_datasets()
    assert data.MNIST_MD5 == dict(tv.MNIST.resources)
    assert data.CIFAR100_PYTHON_MD5 == {
        **dict(tv.CIFAR100.train_list + tv.CIFAR100.test_list),
        tv.CIFAR100.meta["filename"]: tv.CIFAR100.meta["md5"],
    }
