"""Shared test setup: the weights/ folder on sys.path, the fixtures, the shared data, and the
helpers that more than one test file (or make_fixtures.py) uses."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.dirname(TESTS_DIR)
REPO_ROOT = os.path.dirname(WEIGHTS_DIR)
FIXTURES = os.path.join(TESTS_DIR, "fixtures")
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
TRAIN_TAR = os.path.join(SHARED, "data", "cifar10", "train_jpeg.tar.gz")
TEST_FILE = os.path.join(SHARED, "data", "cifar10", "test_lossless.bin")

if WEIGHTS_DIR not in sys.path:
    sys.path.insert(0, WEIGHTS_DIR)


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def load_expected() -> dict:
    with open(fixture_path("expected.json")) as f:
        return json.load(f)["files"]


def array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


NUMPY_OF_TORCH_DTYPE = {
    "float32": "float32", "float16": "float16", "bfloat16": "float32", "float64": "float64",
    "int64": "int64", "bool": "bool",
}


def flatten(obj, where=""):
    """{path: value} of nested dicts / lists / tuples (make_fixtures.describe walks with it too)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{where}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{where}/{i}"))
    else:
        out[where] = obj
    return out


def assert_matches_expected(obj, expected: dict) -> None:
    flat = flatten(obj)
    assert sorted(flat) == sorted(expected), "the reader sees other entries than torch wrote"
    for path, record in expected.items():
        value = flat[path]
        if "value" in record:
            assert value == record["value"], path
            continue
        assert isinstance(value, np.ndarray), f"{path}: {type(value).__name__}, expected an array"
        assert list(value.shape) == record["shape"], path
        assert value.dtype == np.dtype(NUMPY_OF_TORCH_DTYPE[record["dtype"]]), (path, value.dtype)
        assert array_sha256(value) == record["sha256"], f"{path}: values differ from torch's"


def randomize_batchnorm(model, num_batches_tracked: int | None = None) -> None:
    """Random BatchNorm parameters and running statistics (a fresh network has 1, 0, 0, 1), so
    that a test of a converted checkpoint sees them; optionally a num_batches_tracked count."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_()
                if num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(num_batches_tracked)


def log_rows(run_dir) -> list[dict]:
    """The rows of a training run's <run-dir>/loss_log.csv."""
    with open(os.path.join(run_dir, "loss_log.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def shared_data():
    if not (os.path.isfile(TRAIN_TAR) and os.path.isfile(TEST_FILE)):
        pytest.skip("../shared/data/cifar10 is not there")
    return dict(train_tar=TRAIN_TAR, test_file=TEST_FILE)


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """The data flags of a training recipe's command line: the shared data, and a cache of the
    decoded images for the test module."""
    import training_common as tc

    try:
        tc.available_decoder()
    except RuntimeError:
        pytest.skip("no JPEG decoder (pillow or torchvision)")
    cache = str(tmp_path_factory.mktemp("data-cache"))
    return ["--train-tar", shared_data["train_tar"], "--test-file", shared_data["test_file"], "--data-cache", cache]
