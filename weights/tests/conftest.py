"""Shared test setup: the weights/ folder on sys.path, the fixtures, the shared data."""

from __future__ import annotations

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
    """{path: value} of nested dicts / lists / tuples, as make_fixtures.describe walks them."""
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


@pytest.fixture(scope="session")
def shared_data():
    if not (os.path.isfile(TRAIN_TAR) and os.path.isfile(TEST_FILE)):
        pytest.skip("../shared/data/cifar10 is not there")
    return dict(train_tar=TRAIN_TAR, test_file=TEST_FILE)
