"""Fetch MNIST, CIFAR-10 and CIFAR-100 into plain `.npy` arrays, verified and byte-reproducible.

Two sources give the same bytes:

- **Mirror** (offline): set `REPROVISION_DATA_MIRROR=/path/to/datasets` to a folder laid out like
  `/work/shared/datasets` (the official files, see `MIRROR_LAYOUT`). Every file is md5-checked against the
  published checksums before it is parsed, with gzip/lzma/numpy only.
- **Download** (no mirror set): torchvision's own downloaders, which md5-check what they fetch.

Either way each dataset lands in `<out_dir>/<name>/{train_x,train_y,test_x,test_y}.npy` + `classes.json`
(x: uint8 N,C,H,W; y: int64 N), in the official order, and `manifest.json` records the sha256 of every file,
so a run can prove which data it saw. A dataset is written into a temp folder and renamed into place: a
failed fetch never leaves half-written data and keeps an existing good copy untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import math
import os
import pickle
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from urllib.error import URLError

import numpy as np

from reprovision.compat import import_torchvision
from reprovision.config import DATASET_SHAPES, DataConfig
from reprovision.errors import DataError

# torchvision is imported only when downloading (it costs seconds at every stage start otherwise);
# test_data.py checks that the md5 tables below equal torchvision's published ones.
tv_datasets = None


def _torchvision_datasets():
    global tv_datasets
    if tv_datasets is None:
        import_torchvision()
        import torchvision.datasets as tv_datasets_module

        tv_datasets = tv_datasets_module
    return tv_datasets


MIRROR_ENV = "REPROVISION_DATA_MIRROR"
SPLITS = ("train", "test")
MANIFEST = "manifest.json"

# Where each dataset lives inside a mirror (the official archives' layouts), for error messages.
MIRROR_LAYOUT = {
    "mnist": "mnist/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
    "cifar10": "cifar10/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin[.xz] (+ batches.meta.txt)",
    "cifar100": "cifar100/cifar-100-python/{train,test,meta} or "
    "cifar100/cifar-100-binary/{train.bin,test.bin,fine_label_names.txt}",
}

# Checksum tables (module level so tests can swap in the md5s of small generated files).
# MNIST: md5 of the official .gz files, as torchvision publishes them.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# CIFAR-10 binary version: md5 of the *decompressed* files extracted from cifar-10-binary.tar.gz.
CIFAR10_BINARY_MD5: dict[str, str] = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
# CIFAR-100 python version: torchvision's md5s of the extracted pickles.
CIFAR100_PYTHON_MD5: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
# CIFAR-100 binary version: no published md5 of the extracted train.bin/test.bin is known to us (only
# the archive's, 03b5dce01913d631647c71ecec9e9cb8), so by default only the structure is checked (record
# size, label ranges). An entry added here ("train.bin": md5) is enforced like the tables above.
CIFAR100_BINARY_MD5: dict[str, str] = {}

MNIST_CLASSES = [str(digit) for digit in range(10)]
# The label names of CIFAR-10's batches.meta, for a mirror without batches.meta.txt.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Split:
    """One split of one dataset, in memory."""

    x: np.ndarray  # uint8, (N, C, H, W)
    y: np.ndarray  # int64, (N,)
    classes: list[str]


Arrays = dict[str, np.ndarray]  # {"train_x": ..., "train_y": ..., "test_x": ..., "test_y": ...}


def mirror_from_env() -> Path | None:
    value = os.environ.get(MIRROR_ENV, "")
    if not value:
        return None
    mirror = Path(value).expanduser()
    if not mirror.is_dir():
        raise DataError(
            f"{MIRROR_ENV}={value} is not an existing directory: point it at a datasets folder "
            f"(laid out like /work/shared/datasets) or unset it to download the data"
        )
    return mirror


# ---------------------------------------------------------------------------------------- reading


def _require(path: Path, mirror: Path, name: str) -> Path:
    if not path.is_file():
        raise DataError(
            f"{path} not found in the data mirror {mirror} ({MIRROR_ENV}): {name} is expected as "
            f"<mirror>/{MIRROR_LAYOUT[name]}; put the official files there, or unset {MIRROR_ENV} to download"
        )
    return path


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _md5_mismatch(path: Path, expected: str, actual: str, what: str = "") -> DataError:
    return DataError(
        f"{path}: md5{what} is {actual}, expected {expected}: the file is corrupt or truncated; re-download it"
    )


def _check_md5(path: Path, expected: str) -> None:
    actual = _md5(path)
    if actual != expected:
        raise _md5_mismatch(path, expected, actual)


def _read(path: Path, expected_md5: str | None = None) -> bytearray:
    """The (decompressed, for .gz/.xz) bytes of `path`, md5-checked over those bytes when asked.

    Streams in chunks into one buffer and hashes as it goes, so a 30 MB batch is held once.
    """
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    content, md5 = bytearray(), hashlib.md5(usedforsecurity=False)
    try:
        with opener(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                content += chunk
                md5.update(chunk)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise DataError(f"{path} is truncated or corrupt ({err}); re-download it") from None
    if expected_md5 is not None and md5.hexdigest() != expected_md5:
        raise _md5_mismatch(path, expected_md5, md5.hexdigest(), " of the decompressed data")
    return content


def _parse_idx(path: Path, content: bytearray, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """An idx file (MNIST's format): big-endian int32 magic and sizes, then uint8 values."""
    header = 4 * (2 + len(dims))
    found_magic = int.from_bytes(content[:4], "big")
    if found_magic != magic or len(content) < header:
        raise DataError(
            f"{path} is not the expected idx file: magic {found_magic:#x}, {len(content)} bytes "
            f"(expected magic {magic:#x} and a {header}-byte header); re-download it"
        )
    count, *found_dims = np.frombuffer(content, ">i4", count=header // 4)[1:].tolist()
    if tuple(found_dims) != dims:
        raise DataError(f"{path} holds {found_dims} arrays, expected {list(dims)}; re-download it")
    expected = header + count * int(np.prod(dims, dtype=np.int64))
    if len(content) != expected:
        raise DataError(f"{path} holds {len(content)} bytes, its header says {expected}; re-download it")
    return np.frombuffer(content, np.uint8, offset=header).reshape(count, *dims)


def _read_mnist(mirror: Path) -> tuple[Arrays, list[str]]:
    raw = mirror / "mnist" / "MNIST" / "raw"
    arrays: Arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _require(raw / f"{prefix}-images-idx3-ubyte.gz", mirror, "mnist")
        labels = _require(raw / f"{prefix}-labels-idx1-ubyte.gz", mirror, "mnist")
        for path in (images, labels):
            _check_md5(path, MNIST_MD5[path.name])
        x = _parse_idx(images, _read(images), 0x803, (28, 28))
        y = _parse_idx(labels, _read(labels), 0x801, ())
        if len(x) != len(y):
            raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels; re-download them")
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x[:, None], y
    return arrays, MNIST_CLASSES


def _read_records(path: Path, record: int, expected_md5: str | None) -> np.ndarray:
    """A CIFAR binary-version file as (N, record) uint8 rows: label byte(s), then 3072 pixels R, G, B."""
    content = _read(path, expected_md5)
    if not content or len(content) % record:
        raise DataError(
            f"{path} has {len(content)} bytes, not a multiple of the {record}-byte CIFAR records: "
            f"wrong file or truncated; re-download it"
        )
    return np.frombuffer(content, np.uint8).reshape(-1, record)


def _class_names(path: Path, count: int) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != count:
        raise DataError(f"{path} lists {len(names)} class names, expected {count}; re-download it")
    return names


def _read_cifar10(mirror: Path) -> tuple[Arrays, list[str]]:
    folder = mirror / "cifar10" / "cifar-10-batches-bin"
    batches = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}

    def records(name: str) -> np.ndarray:
        plain, packed = folder / name, folder / f"{name}.xz"
        path = plain if plain.is_file() else _require(packed, mirror, "cifar10")
        return _read_records(path, 3073, CIFAR10_BINARY_MD5[name])

    arrays: Arrays = {}
    # lzma and md5 release the GIL: decompressing the six 30 MB batches in threads scales with the cores.
    with ThreadPoolExecutor() as pool:
        for split, names in batches.items():
            rows = np.concatenate(list(pool.map(records, names)))
            arrays[f"{split}_x"], arrays[f"{split}_y"] = rows[:, 1:].reshape(-1, 3, 32, 32), rows[:, 0]
    meta = folder / "batches.meta.txt"
    return arrays, _class_names(meta, 10) if meta.is_file() else CIFAR10_CLASSES


def _read_cifar100(mirror: Path) -> tuple[Arrays, list[str]]:
    python, binary = mirror / "cifar100" / "cifar-100-python", mirror / "cifar100" / "cifar-100-binary"
    if python.is_dir():
        return _read_cifar100_python(python, mirror)
    if binary.is_dir():
        return _read_cifar100_binary(binary, mirror)
    return _read_cifar100_python(python, mirror)  # neither: report the files the python layout needs


def _read_cifar100_python(folder: Path, mirror: Path) -> tuple[Arrays, list[str]]:
    def unpickle(name: str, keys: tuple[str, ...]) -> dict:
        path = _require(folder / name, mirror, "cifar100")
        _check_md5(path, CIFAR100_PYTHON_MD5[name])  # pickle is only trusted once the md5 matches
        with path.open("rb") as fh:
            try:
                entry = pickle.load(fh, encoding="latin1")
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise DataError(f"{path} is not a CIFAR-100 pickle ({err}); re-download it") from None
        if not isinstance(entry, dict) or not set(keys) <= set(entry):
            raise DataError(f"{path} is not a CIFAR-100 pickle (expected the keys {keys}); re-download it")
        return entry

    arrays: Arrays = {}
    for split in SPLITS:
        entry = unpickle(split, ("data", "fine_labels"))
        arrays[f"{split}_x"] = np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32)
        arrays[f"{split}_y"] = np.asarray(entry["fine_labels"])
    return arrays, list(unpickle("meta", ("fine_label_names",))["fine_label_names"])


def _read_cifar100_binary(folder: Path, mirror: Path) -> tuple[Arrays, list[str]]:
    arrays: Arrays = {}
    for split in SPLITS:
        path = _require(folder / f"{split}.bin", mirror, "cifar100")
        rows = _read_records(path, 3074, CIFAR100_BINARY_MD5.get(path.name))
        if rows[:, 0].max() >= 20 or rows[:, 1].max() >= 100:
            raise DataError(f"{path}: labels out of range (coarse < 20, fine < 100): not CIFAR-100; re-download it")
        # Record: coarse label, fine label, pixels; the 100 fine labels are the classes.
        arrays[f"{split}_x"], arrays[f"{split}_y"] = rows[:, 2:].reshape(-1, 3, 32, 32), rows[:, 1]
    names = _require(folder / "fine_label_names.txt", mirror, "cifar100")
    return arrays, _class_names(names, 100)


_MIRROR_READERS = {"mnist": _read_mnist, "cifar10": _read_cifar10, "cifar100": _read_cifar100}

# A lossy JPEG copy of CIFAR-10 small enough to carry to a lent GPU (../shared/datasets/SOURCES.md §3);
# only benchmarks read it (`read_mirror(..., lossy_ok=True)`), never the pipeline.
CIFAR10_JPEG = Path("cifar10/lossy-jpeg/CIFAR-10-images-jpg.tar.gz")
CIFAR10_JPEG_MD5 = "85831f2b9a6b0de08b6d8fd7386ffa93"


def _read_cifar10_jpeg(mirror: Path) -> tuple[Arrays, list[str]]:
    """CIFAR-10-images/{train,test}/<class>/NNNN.jpg: the k-th file of a class is the k-th image of that
    class in the official order, so the images come class by class (the official interleaving is lost)."""
    import tarfile

    from PIL import Image

    path = mirror / CIFAR10_JPEG
    _check_md5(path, CIFAR10_JPEG_MD5)
    files: dict[str, list[tuple[str, int, bytes]]] = {split: [] for split in SPLITS}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] in files and parts[3].endswith(".jpg"):
                files[parts[1]].append((parts[2], int(parts[3].removesuffix(".jpg")), tar.extractfile(member).read()))
    classes = sorted({name for name, _, _ in files["train"]})  # alphabetical is CIFAR-10's label order

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    arrays: Arrays = {}
    for split, entries in files.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        with ThreadPoolExecutor() as pool:  # Pillow decodes with the GIL released
            x = np.stack(list(pool.map(decode, [data for _, _, data in entries])))
        arrays[f"{split}_x"] = x.transpose(0, 3, 1, 2)
        arrays[f"{split}_y"] = np.array([classes.index(name) for name, _, _ in entries], np.int64)
    return arrays, classes


def read_mirror(name: str, mirror: Path, *, lossy_ok: bool = False) -> tuple[Arrays, str]:
    """The four arrays of `name` read from `mirror`, checked as fetch-data checks them, and what they
    were read from. With `lossy_ok` (benchmarks), CIFAR-10 without its binary batches comes from the
    lossy JPEG copy, and the source says so."""
    _check_name(name)
    mirror = Path(mirror)
    binary = mirror / "cifar10" / "cifar-10-batches-bin"
    lossless = any((binary / f"data_batch_1.bin{ext}").is_file() for ext in ("", ".xz"))
    if name == "cifar10" and lossy_ok and not lossless and (mirror / CIFAR10_JPEG).is_file():
        return _checked(name, *_read_cifar10_jpeg(mirror)), f"mirror {CIFAR10_JPEG} (LOSSY JPEG)"
    return _checked(name, *_MIRROR_READERS[name](mirror)), "mirror (lossless, md5-checked)"


_TORCHVISION_CLASS = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _download(name: str) -> tuple[Arrays, list[str]]:
    """torchvision's official download (md5-verified), converted to the mirror's exact arrays."""
    dataset_class = getattr(_torchvision_datasets(), _TORCHVISION_CLASS[name])  # looked up per call: tests swap it
    arrays: Arrays = {}
    with tempfile.TemporaryDirectory(prefix=f"reprovision-{name}-") as root:
        for split in SPLITS:
            try:
                ds = dataset_class(root=root, train=split == "train", download=True)
            except (URLError, OSError, RuntimeError) as err:
                raise DataError(
                    f"could not download {name} ({err}) and no mirror is set: set "
                    f"{MIRROR_ENV}=/path/to/datasets (laid out like <mirror>/{MIRROR_LAYOUT[name]})"
                ) from None
            x = np.asarray(ds.data)
            # MNIST is (N, H, W); CIFAR is NHWC, while the mirror (and torch) use NCHW.
            arrays[f"{split}_x"] = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
            arrays[f"{split}_y"] = np.asarray(ds.targets)
    return arrays, MNIST_CLASSES if name == "mnist" else list(ds.classes)


# ---------------------------------------------------------------------------------------- availability

# The files each mirror reader above needs, relative to the mirror: one list per layout it reads (any one
# complete is enough), "a|b" where either file serves.
_CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MIRROR_FILES: dict[str, list[list[str]]] = {
    "mnist": [
        [
            f"mnist/MNIST/raw/{prefix}-{kind}-ubyte.gz"
            for prefix in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")
        ]
    ],
    "cifar10": [
        [f"cifar10/cifar-10-batches-bin/{b}.bin|cifar10/cifar-10-batches-bin/{b}.bin.xz" for b in _CIFAR10_BATCHES]
    ],
    "cifar100": [
        [f"cifar100/cifar-100-python/{name}" for name in ("train", "test", "meta")],
        [f"cifar100/cifar-100-binary/{name}" for name in ("train.bin", "test.bin", "fine_label_names.txt")],
    ],
}
PREPARED_FILES = [f"{split}_{part}.npy" for split in SPLITS for part in ("x", "y")] + ["classes.json"]


def in_mirror(name: str, mirror: Path) -> bool:
    """Whether `mirror` holds every file fetch-data reads for `name` (present; fetch-data checks their md5s)."""
    return any(
        all(any((mirror / option).is_file() for option in need.split("|")) for need in layout)
        for layout in MIRROR_FILES[name]
    )


def prepared(name: str, out_dir: Path) -> bool:
    """Whether fetch-data's output folder already holds `name`, whole and in its manifest."""
    manifest = Path(out_dir) / MANIFEST
    try:
        listed = name in json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return listed and all((Path(out_dir) / name / file).is_file() for file in PREPARED_FILES)


def check_available(selected: dict[str, str], out_dir: Path, mirror: Path | None) -> dict[str, str]:
    """Where each dataset the params select (`{"data.classifier_dataset": "cifar10", ...}`) would come from,
    checked without reading or downloading anything: a copy already in `out_dir`, the `mirror` (set: fetch-data
    is offline and reads only the mirror), or torchvision's download (no mirror set; not tried here). A DataError
    names each one found nowhere, every place looked, and what to set."""
    found: dict[str, str] = {}
    missing = []
    for key, name in selected.items():
        _check_name(name)
        if mirror is None:
            found[name] = "download (no mirror set)"
        elif in_mirror(name, mirror):
            found[name] = f"mirror {mirror}"
        elif prepared(name, out_dir):
            found[name] = f"already in {Path(out_dir) / name}"
        else:
            missing.append((key, name))
    problems = []
    for key, name in missing:
        field = DataConfig.model_fields.get(key.removeprefix("data."))
        offline = [other for other in get_args(field.annotation) if in_mirror(other, mirror)] if field else []
        problems.append(
            f"{key} = {name} is in neither {Path(out_dir) / name} (no prepared copy) nor the data mirror {mirror} "
            f"({MIRROR_ENV}, expected as <mirror>/{MIRROR_LAYOUT[name]}), and with a mirror set fetch-data does not "
            f"download; put {name}'s official files there, unset {MIRROR_ENV} to download it, or set {key} to "
            f"one the mirror holds ({', '.join(offline) or 'none'})"
        )
    if problems:
        raise DataError("; ".join(problems) + ". Nothing was fetched or removed.")
    return found


# ---------------------------------------------------------------------------------------- writing


def _checked(name: str, arrays: Arrays, classes: list[str]) -> Arrays:
    """The arrays in their one on-disk form (contiguous uint8 NCHW, int64), after a shape/label check."""
    channels, height, width, num_classes = DATASET_SHAPES[name]
    if len(classes) != num_classes:
        raise DataError(f"{name}: {len(classes)} class names, expected {num_classes}; check the source files")
    out: Arrays = {}
    for split in SPLITS:
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.shape[1:] != (channels, height, width) or len(x) != len(y) or len(x) == 0:
            raise DataError(
                f"{name} {split}: images {x.shape} and labels {y.shape}, expected (N, {channels}, {height}, "
                f"{width}) and (N,); the source files are not {name}"
            )
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{name} {split}: labels outside 0..{num_classes - 1}; the source files are not {name}")
        out[f"{split}_x"] = np.ascontiguousarray(x, dtype=np.uint8)
        out[f"{split}_y"] = np.ascontiguousarray(y, dtype=np.int64)
    return out


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _combined_sha256(files: dict[str, str]) -> str:
    """One hash for a dataset: sha256 of its `sha256sum`-style listing, sorted by file name."""
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _write_atomically(dest: Path, arrays: Arrays, classes: list[str]) -> dict[str, str]:
    """Write into a temp folder beside `dest`, then swap it in: `dest` is always whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for key, array in arrays.items():
            np.save(staging / f"{key}.npy", array, allow_pickle=False)
        (staging / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        files = {path.name: _sha256_file(path) for path in sorted(staging.iterdir())}
        # os.replace cannot overwrite a non-empty folder: move the old copy aside, swap, then drop it.
        old = dest.parent / f".{dest.name}.old-{staging.name}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_name(name: str) -> None:
    if name not in DATASET_SHAPES:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_SHAPES)}")


def fetch_dataset(name: str, out_dir: Path, mirror: Path | None) -> dict:
    """Fetch one dataset from `mirror` (or download it when None) into out_dir/<name>; its manifest entry."""
    _check_name(name)
    arrays, classes = _MIRROR_READERS[name](Path(mirror)) if mirror is not None else _download(name)
    arrays = _checked(name, arrays, classes)
    files = _write_atomically(Path(out_dir) / name, arrays, classes)
    return {
        "source": "mirror" if mirror is not None else "download",
        "train": len(arrays["train_y"]),
        "test": len(arrays["test_y"]),
        "classes": classes,
        "files": files,
        "sha256": _combined_sha256(files),  # content only: the same whichever source
    }


def fetch_all(names: list[str], out_dir: Path, mirror: Path | None) -> dict:
    """Fetch each dataset, then write out_dir/manifest.json ({name: entry}) and return it."""
    for name in names:
        _check_name(name)  # fail on a typo before spending minutes on the others
    out_dir = Path(out_dir)
    manifest = {name: fetch_dataset(name, out_dir, mirror) for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, out_dir / MANIFEST)
    return manifest


# ---------------------------------------------------------------------------------------- using


def load_split(data_dir: Path, name: str, split: str) -> Split:
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    folder = Path(data_dir) / name
    paths = [folder / f"{split}_x.npy", folder / f"{split}_y.npy", folder / "classes.json"]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} not found: run the fetch-data stage first (`dvc repro fetch-data`)")
    x, y = (np.load(path, allow_pickle=False) for path in paths[:2])
    return Split(x=x, y=y, classes=json.loads(paths[2].read_text()))


def stratified_draw(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted int64 positions of `size` labels of `y`, each class drawn in proportion to its count.

    Each class gets floor(size x its share), the images left over go to the classes with the largest
    remainders (ties: the lower class), and each class's images are its first ones in a permutation
    seeded by `seed`. (scikit-learn's train_test_split does the same with random tie-breaks; importing
    it cost every stage 1.5-2.5 s, measured, for these few lines.)"""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * size / len(y)
    take = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - take), kind="stable")
    take[by_remainder[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def stratified_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of a deterministic class-stratified `fraction` of `y` (1.0: all of them)."""
    if not 0 < fraction <= 1:
        raise DataError(f"fraction={fraction} is outside (0, 1]; set the data fraction in params.yaml accordingly")
    y = np.asarray(y)
    everything = np.arange(len(y), dtype=np.int64)
    classes = np.unique(y)
    size = max(int(fraction * len(y)), len(classes))  # at least one draw per class
    if fraction == 1 or size >= len(y):
        return everything
    picked = stratified_draw(y, size, seed)
    missing = np.setdiff1d(classes, y[picked])
    if missing.size:  # only with very rare classes: proportional draws can round a class down to 0
        raise DataError(
            f"a {fraction} subset of {len(y)} labels keeps no example of class(es) {missing.tolist()}; "
            f"raise the fraction"
        )
    return picked


def data_sha256(data_dir: Path, name: str) -> str:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: run the fetch-data stage first (`dvc repro fetch-data`)")
    manifest = json.loads(path.read_text())
    if name not in manifest:
        raise DataError(f"{path} has no entry for {name!r} (has: {', '.join(manifest)}): fetch {name} first")
    return manifest[name]["sha256"]


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted positions in `y`: a deterministic class-stratified `fraction` held out.

    fraction 0 holds nothing out (the references' setting). The validation images are for every
    decision (model selection, tuning, "best"); the test split only reports.
    """
    y = np.asarray(y)
    everything = np.arange(len(y), dtype=np.int64)
    if fraction == 0:
        return everything, everything[:0]
    held_out, classes = math.ceil(fraction * len(y)), len(np.unique(y))
    if held_out < classes:
        raise DataError(
            f"cannot hold out a stratified {fraction} of {len(y)} labels for validation: {held_out} images for "
            f"{classes} classes; raise data.val_fraction or data.train_fraction"
        )
    val = stratified_draw(y, held_out, seed)
    return np.setdiff1d(everything, val), val
