"""Reads PyTorch checkpoints (files written by `torch.save`) WITHOUT PyTorch, into numpy.

Why: the converters must run where there is no libtorch (a Jetson with the Rust engine alone),
and a checkpoint is a pickle, which can run arbitrary code when loaded the usual way. This
reader understands both on-disk formats of `torch.save` and nothing more:

- the zip format (torch >= 1.6, the default): `<archive>/data.pkl` holds the pickled object,
  each tensor storage is the raw little-endian bytes of `<archive>/data/<key>`, and
  `<archive>/byteorder` (newer files) says whether they are little- or big-endian;
- the legacy format (`_use_new_zipfile_serialization=False`, and files from before 1.6): five
  pickles in a row (magic number, protocol version, system info, the object, the sorted list of
  storage keys), then each storage as an int64 element count followed by its raw bytes.

The pickle is read by a restricted unpickler: `find_class` knows a short list of globals
(`ALLOWED_GLOBALS`: the tensor rebuild functions, the typed storage classes, `OrderedDict` and the
dtypes) and maps each to a harmless numpy-based stand-in; any other global (`os.system`,
`builtins.eval`, a model class, ...) is refused with `CheckpointError` before anything is called.
A whole pickled model (`torch.save(model)`) is therefore refused too: save its `state_dict()`.

`load_checkpoint(path)` returns the unpickled object with every tensor replaced by a contiguous
numpy array of its dtype (bfloat16, which numpy lacks, becomes float32: exact, every bf16 value
is a float32). `find_state_dict` then digs the name -> tensor mapping out of the usual nestings.
`write_safetensors` and `converter_main` are what the converters (convert_*.py) share.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Iterable

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that is not what the caller expects."""


# torch.save's legacy format starts with this pickled integer.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only carries the numpy dtype. Not callable."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype  # numpy dtype string, little-endian; "bfloat16" is special

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_TYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _Dtype:
    """Stand-in for torch.float32 & co. (they appear in some pickles as plain values)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "float", "double", "half", "long", "int", "short",
)


class _StorageRef:
    """A storage named in the pickle; its bytes are attached after unpickling."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self.array: np.ndarray | None = None  # flat, native byte order, set by the loader


class _TensorRef:
    """A tensor (storage, offset, size, stride), resolved to a numpy array at the end."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _int_tuple(value: Any, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CheckpointError(f"malformed tensor record: {what} is {value!r}, not a tuple of ints")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): the extra arguments (requires_grad, backward hooks,
    metadata) do not change the values, so they are ignored."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"malformed tensor record: storage is {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"malformed tensor record: storage offset {storage_offset!r}")
    return _TensorRef(storage, storage_offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_state):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
    if not isinstance(data, _TensorRef):
        raise CheckpointError(f"malformed parameter record: data is {type(data).__name__}")
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_TYPES.items():
        table[("torch", name)] = _StorageType(name, dtype)
    for name in _DTYPE_NAMES:
        table[("torch", name)] = _Dtype(name)
    return table


ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ALLOWED_GLOBALS, to harmless stand-ins.

    `persistent_load` is given by the caller: it turns a storage record of the pickle into a
    _StorageRef (zip and legacy formats lay these records out differently).
    """

    def __init__(self, file, persistent_load=None):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load: the pickle asks for the global `{module}.{name}`, which is "
                "not a tensor, storage or container type. Only plain state dicts (names -> "
                "tensors, in dicts/lists) are read; this reader never runs code from a "
                "checkpoint. If this is a whole pickled model, save its state_dict() instead."
            ) from None

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise CheckpointError("unexpected persistent id in a pickle that should have none")
        return self._persistent_load(pid)


def _storage_from_record(pid, with_view: bool) -> tuple[str, _StorageType, int, Any]:
    """Parses ('storage', type, key, location, numel[, view_metadata])."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise CheckpointError(f"unknown persistent id {pid!r} (expected a storage record)")
    storage_type, key, numel = pid[1], pid[2], pid[4]  # pid[3]: the device, irrelevant here
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(
            f"storage record of unsupported type {storage_type!r} (supported: "
            + ", ".join(f"torch.{n}" for n in _STORAGE_TYPES)
            + ")"
        )
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointError(f"storage record with bad element count {numel!r}")
    view = pid[5] if with_view and len(pid) > 5 else None
    return str(key), storage_type, numel, view


def _decode_storage(raw: bytes, storage_type: _StorageType, numel: int, big_endian: bool, key: str):
    need = numel * storage_type.itemsize
    if len(raw) < need:
        raise CheckpointError(
            f"storage {key}: {len(raw)} bytes, {need} expected ({numel} x {storage_type!r}): "
            "the file is truncated or corrupt"
        )
    raw = raw[:need]
    if storage_type.dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
        return (bits << np.uint32(16)).view(np.float32)
    dtype = np.dtype(storage_type.dtype)
    if big_endian and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _resolve_tensor(ref: _TensorRef, where: str) -> np.ndarray:
    flat = ref.storage.array
    assert flat is not None
    size, stride = ref.size, ref.stride
    if len(size) != len(stride):
        raise CheckpointError(f"{where}: size {size} and stride {stride} differ in length")
    if any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"{where}: negative size or stride ({size}, {stride})")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = ref.offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointError(
            f"{where}: the tensor (offset {ref.offset}, size {size}, stride {stride}) reaches "
            f"element {last} of a storage of {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=size,
        strides=tuple(s * flat.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


def _resolve(obj: Any, where: str = "checkpoint") -> Any:
    """Replaces every _TensorRef in nested dicts/lists/tuples by its numpy array."""
    if isinstance(obj, _TensorRef):
        return _resolve_tensor(obj, where)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list):
        return [_resolve(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (_StorageRef, _StorageType)):
        raise CheckpointError(f"{where}: a bare storage, not a tensor; not supported")
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointError(f"{path}: a TorchScript archive, not a torch.save checkpoint")
            raise CheckpointError(f"{path}: a zip file without `<archive>/data.pkl`: not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order {order!r}")
            big_endian = order == "big"
        storages: dict[str, _StorageRef] = {}

        def persistent_load(pid):
            key, storage_type, numel, _ = _storage_from_record(pid, with_view=False)
            if key not in storages:
                storages[key] = _StorageRef(key, storage_type, numel)
            return storages[key]

        obj = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), persistent_load).load()
        for key, ref in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise CheckpointError(f"{path}: storage {key} is missing from the archive ({record})")
            ref.array = _decode_storage(archive.read(record), ref.storage_type, ref.numel, big_endian, key)
    return _resolve(obj)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = RestrictedUnpickler(f).load()
        if magic != LEGACY_MAGIC_NUMBER:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no torch.save magic number)")
        version = RestrictedUnpickler(f).load()
        if version != LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: legacy checkpoint protocol {version!r}, expected 1001")
        sys_info = RestrictedUnpickler(f).load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError(f"{path}: written on a big-endian machine; not supported")
        roots: dict[str, _StorageRef] = {}
        views: list[tuple[_StorageRef, _StorageRef, int, int]] = []
        view_refs: dict[str, _StorageRef] = {}

        def persistent_load(pid):
            key, storage_type, numel, view = _storage_from_record(pid, with_view=True)
            if key not in roots:
                roots[key] = _StorageRef(key, storage_type, numel)
            root = roots[key]
            if view is None:
                return root
            # Very old files: (view_key, offset, view_size), a slice of the root storage.
            view_key, offset, view_size = view
            if view_key not in view_refs:
                ref = _StorageRef(str(view_key), storage_type, view_size)
                view_refs[view_key] = ref
                views.append((ref, root, int(offset), int(view_size)))
            return view_refs[view_key]

        obj = RestrictedUnpickler(f, persistent_load).load()
        keys = RestrictedUnpickler(f).load()
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: malformed legacy checkpoint (no storage key list)")
        for key in keys:
            key = str(key)
            header = f.read(8)
            if len(header) < 8:
                raise CheckpointError(f"{path}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", header)
            if key not in roots:
                raise CheckpointError(f"{path}: storage {key} is stored but never used")
            ref = roots[key]
            raw = f.read(numel * ref.storage_type.itemsize)
            ref.array = _decode_storage(raw, ref.storage_type, numel, False, key)
            ref.numel = numel
        for key, ref in roots.items():
            if ref.array is None:
                raise CheckpointError(f"{path}: storage {key} is used but missing")
        for ref, root, offset, size in views:
            ref.array = root.array[offset : offset + size]
    return _resolve(obj)


def load_checkpoint(path: str) -> Any:
    """Loads a torch.save file into nested dicts/lists with numpy arrays for tensors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head.startswith(b"PK"):
            return _load_zip(path)
        if head[:1] == b"\x80":
            return _load_legacy(path)
        if len(head) == 0:
            raise CheckpointError(f"{path}: empty file")
        raise CheckpointError(
            f"{path}: neither a zip nor a pickle: not a torch.save checkpoint (or an old tar one)"
        )
    except CheckpointError:
        raise
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError, IndexError,
            KeyError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Finding the state dict inside a checkpoint
# ---------------------------------------------------------------------------------------------

def is_state_dict(obj: Any) -> bool:
    """A non-empty dict whose keys are strings and whose values are all arrays."""
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, np.ndarray) for v in obj.values())
    )


DEFAULT_NESTING_KEYS = ("ema", "state_dict", "model", "model_state_dict", "net")


def find_state_dict(obj: Any, keys: Iterable[str] = DEFAULT_NESTING_KEYS, path: str = "checkpoint",
                    key: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Returns (state dict, where it was found).

    With `key` (e.g. "ema" or "model/state_dict"), takes exactly that nesting. Otherwise the
    object itself if it is a state dict, else the first of `keys` present (depth-first, in that
    order; so an EMA copy wins over the raw weights when a checkpoint has both).
    """
    if key is not None:
        node, where = obj, ""
        for part in key.split("/"):
            if not isinstance(node, dict) or part not in node:
                have = sorted(map(str, node)) if isinstance(node, dict) else type(node).__name__
                raise CheckpointError(f"{path}: no entry {key!r} (at {part!r}; found {have})")
            node, where = node[part], f"{where}/{part}" if where else part
        if not is_state_dict(node):
            raise CheckpointError(f"{path}: entry {key!r} is not a mapping of names to tensors")
        return dict(node), where

    def search(node: Any, where: str):
        if is_state_dict(node):
            return dict(node), where or "(top level)"
        if isinstance(node, dict):
            for k in keys:
                if k in node:
                    found = search(node[k], f"{where}/{k}" if where else k)
                    if found is not None:
                        return found
        return None

    found = search(obj, "")
    if found is None:
        if isinstance(obj, dict):
            described = ", ".join(
                f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:20]
            )
            raise CheckpointError(
                f"{path}: no state dict found. The top level has {{{described}}}; a state dict "
                f"(names -> tensors) was looked for at the top and under {list(keys)}. "
                "Name the entry with --key."
            )
        raise CheckpointError(f"{path}: the checkpoint is a {type(obj).__name__}, not a state dict")
    return found


def strip_prefixes(state: dict[str, np.ndarray], prefixes: Iterable[str] = ("module.",)) -> dict[str, np.ndarray]:
    """Strips a prefix shared by every key (DataParallel's `module.`, repeatedly if nested)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def check_against_layout(state: dict[str, np.ndarray], expected: dict[str, tuple], what: str,
                         source: str) -> None:
    """Every expected name present with its shape, no other name, every value finite."""
    missing = [k for k in expected if k not in state]
    extra = sorted(k for k in state if k not in expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:8])
                        + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): " + ", ".join(extra[:8])
                        + (" ..." if len(extra) > 8 else ""))
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            problems.append(f"`{name}` has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    if problems:
        raise CheckpointError(f"{source}: not a {what} checkpoint: " + "; ".join(problems))
    for name in expected:
        value = state[name]
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: `{name}` has dtype {value.dtype}, expected a float tensor")
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise CheckpointError(f"{source}: `{name}` has {bad} non-finite value(s) (NaN or Inf)")


def write_safetensors(state: dict[str, np.ndarray], path: str, fp16: bool,
                      metadata: dict[str, str]) -> None:
    """Writes float tensors as F32 (or F16), atomically (a temporary file, then a rename)."""
    from safetensors.numpy import save_file

    dtype = np.float16 if fp16 else np.float32
    out = {}
    for name, value in state.items():
        converted = np.asarray(value, dtype=dtype).copy(order="C")
        if fp16 and not np.all(np.isfinite(converted)):
            raise CheckpointError(f"`{name}` overflows float16 (max |x| = {np.abs(value).max():.3g}); use f32")
        out[name] = converted
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    save_file(out, tmp, metadata=metadata)
    os.replace(tmp, path)


def converter_main(convert: Callable[..., dict], argv, description: str, checkpoint_help: str,
                   fp16_help: str, key_help: str) -> int:
    """The command line of a converter: `CHECKPOINT OUTPUT [--fp16] [--key KEY]`, then
    convert(checkpoint, output, fp16=..., key=...). Exit status 0, or 1 with `error: ...` on
    stderr when the checkpoint is refused (CheckpointError)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("output", help="safetensors file to write")
    p.add_argument("--fp16", action="store_true", help=fp16_help)
    p.add_argument("--key", help=key_help)
    args = p.parse_args(argv)
    try:
        convert(args.checkpoint, args.output, fp16=args.fp16, key=args.key)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
