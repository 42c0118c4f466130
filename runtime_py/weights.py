"""Read safetensors tensors as float32 numpy arrays, without torch.

F32 and F16 tensors go through `safetensors`' numpy API (memory-mapped by safetensors). numpy has no bfloat16, so
BF16 tensors are read from the file directly: a safetensors file is an 8-byte little-endian header length, a JSON
header (name -> dtype, shape, data_offsets relative to the end of the header), then the raw tensor bytes. We
memory-map the file and widen each bf16 value to float32 by putting its 16 bits on top of a zero low half: bf16 is
exactly the upper half of an fp32, so this conversion is exact.

Every tensor is checked for NaN/inf as it is read; a bad file fails with one `PocketllmError` naming it.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

SUPPORTED_DTYPES = ("F32", "F16", "BF16")


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without `__metadata__`, byte offset where tensor data starts) of one safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PocketllmError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise PocketllmError(f"{path}: safetensors file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PocketllmError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PocketllmError(f"{path}: corrupt safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact): the 16 bits become the high half of the fp32 word."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_finite(path: Path, name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise PocketllmError(f"{path}: tensor '{name}' has {bad} non-finite values (NaN or inf)")


def load_file(path: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors `names` (default: all) of one safetensors file, each as a float32 array of its stored shape."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header, data_start = read_header(path)
    wanted = sorted(header) if names is None else sorted(names)
    out: dict[str, np.ndarray] = {}
    raw = None  # uint8 memory map of the whole file, opened on the first BF16 tensor
    try:
        with safe_open(path, framework="numpy") as f:
            for name in wanted:
                info = header.get(name)
                if info is None:
                    raise PocketllmError(f"{path}: tensor '{name}' not found")
                dtype, shape = info["dtype"], tuple(info["shape"])
                if dtype == "BF16":
                    if raw is None:
                        raw = np.memmap(path, dtype=np.uint8, mode="r")
                    begin, end = (data_start + o for o in info["data_offsets"])
                    if end > raw.size or end - begin != 2 * int(np.prod(shape)):
                        raise PocketllmError(f"{path}: tensor '{name}' lies outside the file or has the wrong "
                                             "byte size (truncated or corrupt safetensors file)")
                    bits = raw[begin:end].view("<u2").reshape(shape)
                    x = bf16_bits_to_f32(bits)
                elif dtype in ("F32", "F16"):
                    x = f.get_tensor(name).astype(np.float32, copy=False)
                else:
                    raise PocketllmError(f"{path}: tensor '{name}' has dtype {dtype}, expected one of "
                                         f"{', '.join(SUPPORTED_DTYPES)}")
                _check_finite(path, name, x)
                out[name] = np.ascontiguousarray(x)
    except SafetensorError as e:
        raise PocketllmError(f"{path}: corrupt safetensors file ({e})") from None
    finally:
        del raw  # drop the map; arrays in `out` are owned copies
    return out


def load_weights(checkpoint_dir: str | Path, weight_map: dict[str, str]) -> dict[str, np.ndarray]:
    """All tensors of `weight_map` (tensor name -> shard file name) as float32 arrays, read shard by shard."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in weight_map.items():
        by_shard[shard].append(name)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(by_shard):
        out.update(load_file(Path(checkpoint_dir) / shard, by_shard[shard]))
    return out
