"""What the two training recipes (train_ddpm.py, train_auxiliary.py) share.

- the CIFAR-10 training images, read from the JPEG tarball of ../shared/data (decoded with
  torchvision.io.decode_jpeg when torchvision is there, else PIL) and cached as .npy under
  data-cache/ (git-ignored);
- the test images of test_lossless.bin;
- the run directory: config.json (and the check that a resumed run keeps its recipe), an
  append-only CSV log, atomic checkpoint and safetensors writes, the model card's file;
- the order of the training images (per-step seeds, one permutation per epoch), so that a
  resumed run draws what an uninterrupted one would have;
- a wall-clock budget that lets a run stop cleanly before a device call's limit;
- the recipe flags of the command line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from typing import Any, Iterable

import numpy as np

WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(WEIGHTS_DIR)
SHARED_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared")
DATA_CACHE = os.path.join(REPO_ROOT, "data-cache")
SHARED_TRAIN_TAR = os.path.join(SHARED_DIR, "data", "cifar10", "train_jpeg.tar.gz")
CACHED_TRAIN_TAR = os.path.join(DATA_CACHE, "train_jpeg.tar.gz")
TEST_LOSSLESS = os.path.join(SHARED_DIR, "data", "cifar10", "test_lossless.bin")

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_train_tar() -> str:
    """data-cache/train_jpeg.tar.gz (the copy carried to the device) if present, else ../shared."""
    return CACHED_TRAIN_TAR if os.path.isfile(CACHED_TRAIN_TAR) else SHARED_TRAIN_TAR


def default_test_file() -> str:
    """test_lossless.bin: ../shared on a developer machine; data-cache/ on the device (carried)."""
    carried = os.path.join(DATA_CACHE, "test_lossless.bin")
    return TEST_LOSSLESS if os.path.isfile(TEST_LOSSLESS) else carried


def standard_resnet20() -> str:
    """The standard-trained ResNet-20 of ../shared/weights (the judge of METHOD.md's quality bars):
    ../shared on a developer machine, data-cache/ on the device (carried)."""
    shared = os.path.join(SHARED_DIR, "weights", "resnet20_cifar10.safetensors")
    carried = os.path.join(DATA_CACHE, "resnet20_cifar10.safetensors")
    return shared if os.path.isfile(shared) or not os.path.isfile(carried) else carried


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def available_decoder() -> str:
    try:
        import torchvision.io  # noqa: F401

        return "torchvision"
    except Exception:
        pass
    try:
        import PIL.Image  # noqa: F401

        return "pil"
    except ImportError:
        raise RuntimeError(
            "no JPEG decoder: install torchvision or pillow (pip install pillow)"
        ) from None


def decode_jpegs(blobs: list[bytes], decoder: str) -> np.ndarray:
    """JPEG bytes -> N x 3 x H x W uint8 RGB."""
    if decoder == "torchvision":
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB)
        return np.stack([d.numpy() for d in decoded])
    if decoder == "pil":
        from PIL import Image

        out = []
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                out.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
        return np.stack(out)
    raise ValueError(f"unknown JPEG decoder {decoder!r}")


def read_jpeg_tarball(tar_path: str, limit: int | None = None) -> tuple[list[str], list[bytes]]:
    """(member names, JPEG bytes) of `train/<class>/NNNN.jpg`, sorted by name. With `limit`, a
    class-balanced subset: the first limit/10 JPEGs of each class in the archive's order (the
    archive is grouped by class, so its first N members would all be one class)."""
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(
            f"{tar_path}: no such file. Copy ../shared/data/cifar10/train_jpeg.tar.gz to "
            "data-cache/ (and carry data-cache/train_jpeg.tar.gz on the device)."
        )
    quota = None
    if limit is not None:
        quota = [limit // 10 + (1 if c < limit % 10 else 0) for c in range(10)]
    found: list[tuple[str, bytes]] = []
    with tarfile.open(tar_path, "r:*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                continue
            if quota is not None:
                c = label_of(member.name)
                if quota[c] == 0:
                    if not any(quota):
                        break
                    continue
                quota[c] -= 1
            handle = archive.extractfile(member)
            assert handle is not None
            found.append((member.name, handle.read()))
    found.sort(key=lambda item: item[0])
    return [n for n, _ in found], [b for _, b in found]


def label_of(member_name: str) -> int:
    parts = member_name.replace("\\", "/").split("/")
    for part in parts[::-1][1:]:
        if part in CIFAR_CLASSES:
            return CIFAR_CLASSES.index(part)
    raise ValueError(f"{member_name}: no CIFAR-10 class folder in the path")


def load_train_images(tar_path: str | None = None, cache_dir: str = DATA_CACHE,
                      limit: int | None = None, decoder: str | None = None,
                      verbose: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images N x 3 x 32 x 32 uint8, labels N int64, info). Decoded once, then read from
    `<cache_dir>/cifar10_train_<decoder>_<n>_<tar size>.npz`."""
    tar_path = tar_path or default_train_tar()
    decoder = decoder or available_decoder()
    size = os.path.getsize(tar_path) if os.path.isfile(tar_path) else 0
    tag = f"cifar10_train_{decoder}_{'all' if limit is None else limit}_{size}"
    cache = os.path.join(cache_dir, tag + ".npz")
    if os.path.isfile(cache):
        with np.load(cache) as z:
            images, labels = z["images"], z["labels"]
        info = dict(source=tar_path, decoder=decoder, cache=cache, count=int(len(labels)))
        return images, labels, info
    start = time.time()
    names, blobs = read_jpeg_tarball(tar_path, limit)
    if not names:
        raise ValueError(f"{tar_path}: no JPEG files in the archive")
    try:
        chunks = [decode_jpegs(blobs[i : i + 4096], decoder) for i in range(0, len(blobs), 4096)]
    except Exception as e:
        if decoder != "torchvision":
            raise
        print(f"torchvision could not decode the JPEGs ({type(e).__name__}: {e}); using PIL", flush=True)
        decoder = "pil"
        cache = os.path.join(cache_dir, f"cifar10_train_pil_{'all' if limit is None else limit}_{size}.npz")
        chunks = [decode_jpegs(blobs[i : i + 4096], decoder) for i in range(0, len(blobs), 4096)]
    # (the decoders' arrays are transposed views: make them N, C, H, W in memory, or the
    # training's random draws would land on other pixels than in a run that reads the cache)
    images = np.ascontiguousarray(np.concatenate(chunks))
    labels = np.array([label_of(n) for n in names], dtype=np.int64)
    if images.shape[1:] != (3, 32, 32):
        raise ValueError(f"{tar_path}: images of shape {images.shape[1:]}, expected 3 x 32 x 32")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
    if verbose:
        print(f"decoded {len(names)} JPEGs with {decoder} in {time.time() - start:.1f} s -> {cache}", flush=True)
    return images, labels, dict(source=tar_path, decoder=decoder, cache=cache, count=int(len(labels)))


def read_test_images(path: str | None = None, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """test_lossless.bin: (N x 3 x 32 x 32 uint8, labels)."""
    path = path or default_test_file()
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073 != 0:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR records")
    records = raw.reshape(-1, 3073)
    if count is not None:
        records = records[:count]
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].astype(np.int64)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of the random draws of `step` (or of epoch `step`) in random stream `stream`."""
    return (seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1)


class BatchOrder:
    """Which images make the batch of a step: epoch e visits the images in a permutation drawn
    from (seed, e), batch after batch (a last incomplete batch is dropped). It depends only on
    the step, so a run resumed at any step sees the batches an uninterrupted run would have."""

    def __init__(self, n_images: int, batch: int, seed: int, device):
        self.n_images = n_images
        self.batch = batch
        self.seed = seed
        self.device = device
        self.steps_per_epoch = n_images // batch
        self.epoch, self.perm = -1, None

    def indices(self, step: int):
        import torch

        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.perm = torch.randperm(self.n_images, generator=torch.Generator().manual_seed(
                step_seed(self.seed, epoch, stream=1))).to(self.device)
            self.epoch = epoch
        return self.perm[pos * self.batch : (pos + 1) * self.batch]


# ---------------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------------

def check_same_recipe(run_dir: str, stored: dict, given: dict) -> None:
    """A resumed run keeps the recipe it was started with: every recipe flag given on the
    command line (`given`) must agree with the stored recipe."""
    for k, v in given.items():
        if stored.get(k) != v:
            raise SystemExit(
                f"error: {run_dir} was started with {k} = {stored.get(k)!r}; --{k.replace('_', '-')} "
                f"{v!r} would change the recipe of a resumed run. Drop the flag or use a new --run-dir."
            )


def run_environment(run_dir: str) -> dict:
    """The environment recorded in <run-dir>/config.json ({} if there is no config.json)."""
    path = os.path.join(run_dir, "config.json")
    return read_json(path).get("environment", {}) if os.path.isfile(path) else {}


def git_revision() -> str:
    """The project's git revision; GIT_REV in the environment wins (the device has no .git)."""
    if os.environ.get("GIT_REV"):
        return os.environ["GIT_REV"]
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        rev = out.stdout.strip() if out.returncode == 0 else ""
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "weights"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except Exception:
        return "unknown"


def environment() -> dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class CsvLog:
    """Append-only CSV (header written once). Rows past `truncate_after_step` are dropped when a
    run resumes from an earlier checkpoint, so the log always matches the checkpoint."""

    def __init__(self, path: str, columns: Iterable[str]):
        self.path = path
        self.columns = list(columns)

    def truncate_after(self, step: int) -> None:
        rows = self.read()
        if rows and any(int(float(r["step"])) > step for r in rows):
            self._rewrite([r for r in rows if int(float(r["step"])) <= step])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.columns})
        os.replace(tmp, self.path)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = not os.path.isfile(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.columns})

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def atomic_torch_save(obj: Any, path: str) -> float:
    """torch.save to a temporary file, then rename: a run killed mid-write keeps the old
    checkpoint. Returns the seconds it took."""
    import torch

    start = time.time()
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return time.time() - start


def load_torch_checkpoint(path: str, checkpoint_format: str) -> dict:
    """torch.load of a recipe's checkpoint.pt (on the CPU), which must be of `checkpoint_format`."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != checkpoint_format:
        raise SystemExit(f"error: {path} is not a {checkpoint_format} checkpoint")
    return ck


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file to a temporary file, then rename (the folder is created)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_card(path: str, lines: list[str], git: str, env: dict, device_train_recipe: str) -> str:
    """Writes a model card: `lines`, then where it was trained and how to reproduce it."""
    lines = lines + [
        f"Trained at git revision {git}; environment {env if env else 'unrecorded'}.",
        f"Reproduce: see weights/README.md (`bash weights/device_train.sh {device_train_recipe}`).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TimeBudget:
    """Wall-clock budget for the whole command, counted from its start."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.seconds = seconds
        self.start = start if start is not None else time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no CUDA GPU")
    return torch.device(name)


def add_recipe_flags(parser, recipe_types: dict, recipe_defaults: dict) -> None:
    """--<key> for every key of the recipe; default None: not given (see check_same_recipe)."""
    for key, kind in recipe_types.items():
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                            help=f"recipe (default {recipe_defaults[key]})")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    sys.stdout.flush()
