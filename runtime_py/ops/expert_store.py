"""numpy twin of the expert store (kernels/expert_store.{h,cpp}): the `experts.bin` side file of a bundle and the two
ops that read it, pocketllm::expert_store_prefetch and pocketllm::expert_store_moe_ffn.

An MoE bundle exported with `--experts file` keeps its routed experts out of the `.pte`: one block per (layer,
expert) in `experts.bin`, which the kernel library reads itself (memory-mapped, or through an LRU of expert slots
under a memory budget) instead of ExecuTorch's constant data. This module is the file format's second
implementation (the kernel's is C++): it parses and checks a file exactly as the kernel does (same one-line errors)
and gives each layer's experts as the stacked arrays `moe_ffn` / `moe_ffn_any4` take, without copying (strided
views over a memory map).

File format, version 1, little-endian:

    header (128 bytes)   magic "PLMEXPRT", u32 version, u32 layers, u32 alignment, u32 0, u64 data_offset,
                         u64 file_size, 16-byte store id, u64 tables_sum1, u64 tables_sum2, u64 tables_bytes,
                         40 zero bytes, u64 header_sum (checksum fold of bytes 0..120)
    layer table          one 64-byte entry per MoE layer: u32 layer (model layer index), format (0 fp32, 1 bf16,
                         2 any4), experts E, ffn F, hidden H, gate_groups, up_groups, down_groups (any4 groups per
                         row; 0 for float), lut_dtype (0 bf16, 1 fp16), scales_dtype (0 fp16, 1 fp32); u64
                         block_bytes, block_stride, first_offset
    expert table         per layer, per expert: u64 sum1, u64 sum2 (the checksum of its block)
    blocks               expert e of a layer at first_offset + e * block_stride (block_stride: block_bytes rounded
                         up to `alignment`, 16 KiB: whole pages on 4 KiB and 16 KiB page systems)

A block holds one expert's tensors in a fixed order, each starting at a multiple of 64 bytes (zero padding):
    float (fp32 / bf16):  gate [F, H], up [F, H], down_t [F, H]   (down_t = the down weight transposed)
    any4:                 gate_qweight u8 [F, H/2], gate_lut [F, 16], gate_scales [F, Gg], gate_zeros [F, Gg],
                          up_* (the same with Gu), down_qweight u8 [H, F/2], down_lut [H, 16], down_scales [H, Gd],
                          down_zeros [H, Gd]
Checksum of a block (or the tables): its bytes as n little-endian u64 words w_i, sum1 = sum w_i, sum2 =
sum (n - i) w_i, both mod 2^64: any change of a single word, and any swap of two different words, changes it.
The header's own sum is fold(sum1, sum2) = sum1 ^ (sum2 * 0x9E3779B97F4A7C15) mod 2^64 of its first 120 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.ops import moe_ffn as moe_ops

MAGIC = b"PLMEXPRT"
VERSION = 1
HEADER_BYTES = 128
ALIGNMENT = 16384
TENSOR_ALIGN = 64
HEADER = struct.Struct("<8sIIIIQQ16sQQQ40xQ")
LAYER = struct.Struct("<10I3Q")
EXPERT = struct.Struct("<QQ")
FORMATS = {0: "fp32", 1: "bf16", 2: "any4"}
LUT_DTYPES = {0: "bf16", 1: "fp16"}
SCALES_DTYPES = {0: "fp16", 1: "fp32"}
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
assert HEADER.size == HEADER_BYTES and LAYER.size == 64


def checksum(data) -> tuple[int, int]:
    """(sum1, sum2) of a buffer whose length is a multiple of 8 (see the module docstring)."""
    w = np.frombuffer(data, dtype="<u8")
    n = w.size
    with np.errstate(over="ignore"):
        s1 = int(w.sum(dtype=np.uint64))
        s2 = int((w * np.arange(n, 0, -1, dtype=np.uint64)).sum(dtype=np.uint64)) if n else 0
    return s1, s2


def fold(s1: int, s2: int) -> int:
    return (s1 ^ (s2 * GOLDEN)) & MASK


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class LayerEntry:
    layer: int
    format: str  # fp32 | bf16 | any4
    experts: int
    ffn: int
    hidden: int
    gate_groups: int = 0
    up_groups: int = 0
    down_groups: int = 0
    lut_dtype: str = "bf16"
    scales_dtype: str = "fp16"
    block_bytes: int = 0
    block_stride: int = 0
    first_offset: int = 0

    def tensors(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of one expert's tensors, in block order. dtypes: fp32, bf16, fp16, u8."""
        F, H = self.ffn, self.hidden
        if self.format != "any4":
            return [(n, self.format, (F, H)) for n in ("gate", "up", "down_t")]
        out = []
        for proj, N, K, G in (("gate", F, H, self.gate_groups), ("up", F, H, self.up_groups),
                              ("down", H, F, self.down_groups)):
            out += [(f"{proj}_qweight", "u8", (N, K // 2)), (f"{proj}_lut", self.lut_dtype, (N, 16)),
                    (f"{proj}_scales", self.scales_dtype, (N, G)), (f"{proj}_zeros", self.scales_dtype, (N, G))]
        return out

    def layout(self) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
        """([(name, dtype, shape, byte offset in the block)], block_bytes)."""
        out, at = [], 0
        for name, dtype, shape in self.tensors():
            at = align(at, TENSOR_ALIGN)
            out.append((name, dtype, shape, at))
            at += int(np.prod(shape)) * ITEMSIZE[dtype]
        return out, align(at, TENSOR_ALIGN)

    def pack(self) -> bytes:
        codes = {v: k for k, v in FORMATS.items()}
        return LAYER.pack(self.layer, codes[self.format], self.experts, self.ffn, self.hidden, self.gate_groups,
                          self.up_groups, self.down_groups, {"bf16": 0, "fp16": 1}[self.lut_dtype],
                          {"fp16": 0, "fp32": 1}[self.scales_dtype], self.block_bytes, self.block_stride,
                          self.first_offset)


ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1}


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements (viewed as raw integers or floats) -> float32, exactly."""
    if dtype == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "fp16":
        return raw.view(np.float16).astype(np.float32)
    return raw.astype(np.float32)


_RAW = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.uint16, "u8": np.uint8}


class ExpertFile:
    """A parsed, checked `experts.bin` (memory-mapped). Raises PocketllmError, one line, for a file that is not an
    expert store, has another version, or is truncated or corrupt in its header or tables; expert blocks are
    checked by `verify` (the kernel checks each the first time it reads it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        name = self.path.name
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise PocketllmError(f"{self.path}: cannot open expert store ({e.strerror})") from None
        if size < HEADER_BYTES:
            raise PocketllmError(f"{name}: truncated expert store ({size} bytes; the header alone is "
                                 f"{HEADER_BYTES}); re-export the bundle")
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        head = bytes(self.map[:HEADER_BYTES])
        (magic, version, n_layers, alignment, _, data_offset, file_size, store_id, t1, t2, t_bytes,
         header_sum) = HEADER.unpack(head)
        if magic != MAGIC:
            raise PocketllmError(f"{name}: not a pocketllm expert store (bad magic)")
        if version != VERSION:
            raise PocketllmError(f"{name}: expert store version {version}; this pocketllm reads {VERSION} "
                                 "(re-export the bundle)")
        if fold(*checksum(head[:120])) != header_sum:
            raise PocketllmError(f"{name}: corrupt expert store header (checksum mismatch); re-export the bundle")
        if size != file_size:
            what = "truncated" if size < file_size else "oversized"
            raise PocketllmError(f"{name}: {what} expert store ({size} bytes; its header says {file_size}); "
                                 "re-export the bundle")
        tables = bytes(self.map[HEADER_BYTES:HEADER_BYTES + t_bytes])
        if len(tables) != t_bytes or t_bytes % 8 or checksum(tables) != (t1, t2):
            raise PocketllmError(f"{name}: corrupt expert store tables (checksum mismatch); re-export the bundle")
        self.id = store_id.hex()
        self.alignment = alignment
        self.layers: dict[int, LayerEntry] = {}
        self.sums: dict[int, list[tuple[int, int]]] = {}
        at = n_layers * LAYER.size
        for i in range(n_layers):
            v = LAYER.unpack_from(tables, i * LAYER.size)
            entry = LayerEntry(v[0], FORMATS.get(v[1], "?"), *v[2:8], LUT_DTYPES.get(v[8], "?"),
                               SCALES_DTYPES.get(v[9], "?"), *v[10:])
            _, block_bytes = entry.layout() if "?" not in (entry.format, entry.lut_dtype, entry.scales_dtype) \
                else (None, -1)
            end = entry.first_offset + entry.experts * entry.block_stride
            if (block_bytes != entry.block_bytes or entry.block_stride < entry.block_bytes or entry.experts < 1
                    or entry.first_offset < data_offset or end > size or at + entry.experts * EXPERT.size > t_bytes):
                raise PocketllmError(f"{name}: corrupt expert store: layer {entry.layer}'s entry does not fit the "
                                     "file; re-export the bundle")
            self.sums[entry.layer] = [EXPERT.unpack_from(tables, at + e * EXPERT.size) for e in range(entry.experts)]
            at += entry.experts * EXPERT.size
            self.layers[entry.layer] = entry

    def block(self, layer: int, expert: int) -> np.ndarray:
        entry = self.layers[layer]
        start = entry.first_offset + expert * entry.block_stride
        return self.map[start:start + entry.block_bytes]

    def verify(self, layer: int, expert: int) -> None:
        if checksum(self.block(layer, expert)) != self.sums[layer][expert]:
            raise PocketllmError(f"{self.path.name}: layer {layer} expert {expert} fails its checksum (the file is "
                                 "corrupt); re-export the bundle")

    def stacked(self, layer: int) -> dict[str, np.ndarray]:
        """name -> [E, ...] raw array (strided view of the map: no copy), as the block stores it."""
        entry = self.layers[layer]
        layout, _ = entry.layout()
        out = {}
        for name, dtype, shape, offset in layout:
            raw = _RAW[dtype]
            item = np.dtype(raw).itemsize
            strides = (entry.block_stride,) + tuple(int(np.prod(shape[i + 1:])) * item for i in range(len(shape)))
            out[name] = np.lib.stride_tricks.as_strided(_view(self.map, entry.first_offset + offset, raw),
                                                        shape=(entry.experts, *shape), strides=strides,
                                                        writeable=False)
        return out

    def expert_arrays(self, layer: int) -> tuple[str, dict[str, np.ndarray]]:
        """(format, the op's arguments as float32 / uint8 arrays [E, ...]) for runtime_py.ops.moe_ffn."""
        entry = self.layers[layer]
        raw = self.stacked(layer)
        dtypes = {name: dtype for name, dtype, _ in entry.tensors()}
        return entry.format, {n: a if dtypes[n] == "u8" else widen(a, dtypes[n]) for n, a in raw.items()}


def _view(mm: np.ndarray, offset: int, raw) -> np.ndarray:
    """The map from byte `offset` on, viewed as `raw` elements (offset is a multiple of the element size)."""
    item = np.dtype(raw).itemsize
    n = (mm.size - offset) // item
    return np.ndarray((n,), dtype=raw, buffer=mm, offset=offset)


# ------------------------------------------------------------------------------------------ the ops
def expert_store_prefetch(expert_ids: np.ndarray, store: ExpertFile, layer: int) -> np.ndarray:
    """Asks the store to bring the experts in ahead of use; the value is the ids, unchanged."""
    return np.array(expert_ids, copy=True)


def expert_store_moe_ffn(u: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, store: ExpertFile,
                         layer: int, activation: str) -> np.ndarray:
    """moe_ffn / moe_ffn_any4 on the layer's experts as the store holds them (routed experts checked first)."""
    for e in np.unique(expert_ids):
        store.verify(layer, int(e))
    fmt, a = store.expert_arrays(layer)
    if fmt == "any4":
        names = [f"{p}_{s}" for p in ("gate", "up", "down") for s in ("qweight", "lut", "scales", "zeros")]
        return moe_ops.moe_ffn_any4(u, expert_ids, expert_weights, *(a[n] for n in names), activation)
    return moe_ops.moe_ffn(u, expert_ids, expert_weights, a["gate"], a["up"], a["down_t"], activation)
