"""pocketllm::expert_store_prefetch, pocketllm::expert_store_moe_ffn: MoE experts read from an expert store (a bundle's
`experts.bin`, format in runtime_py/ops/expert_store.py) instead of the program's constants.

Schemas:
    expert_store_prefetch(Tensor expert_ids, str store, int layer) -> Tensor
    expert_store_moe_ffn(Tensor x, Tensor expert_ids, Tensor expert_weights, str store, int layer, str activation)
        -> Tensor
    and each `.out(..., *, Tensor(a!) out) -> Tensor(a!)`.

store: the store's id (32 hex digits, in the file's header); layer: the model layer whose experts are meant.
expert_store_prefetch returns expert_ids unchanged; its effect is on the store: the kernel starts bringing those experts
in on a helper thread (SmallThinker's router runs before attention, so the exporter places this call right after
the router and the loads overlap attention). expert_store_moe_ffn is moe_ffn / moe_ffn_any4 (export/ops/moe_ffn.py: same
math, same accumulation order) on the layer's experts as the store holds them (fp32, bf16 or any4).

Why the weights are not tensor arguments: ExecuTorch maps (or reads, or mlocks) a program's constants as the app's
loader decides, all or nothing, so a runtime cannot bound how much of them is resident; the store is read by our
kernel library, which can (kernels/README.md, "Expert store").

Eager references look the store up in this process's registry (`register_store(path)`); under torch.export the ops
are opaque (fake impls) and lower to kernels/expert_store.cpp.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB
from pocketllm.export.ops.moe_ffn import check_routing_args, moe_ffn_any4_reference, moe_ffn_reference
from pocketllm.runtime_py.ops.expert_store import (ALIGNMENT, EXPERT, HEADER, HEADER_BYTES, LAYER, MAGIC, VERSION,
                                                   ExpertFile, LayerEntry, align, checksum, fold)

LIB.define("expert_store_prefetch(Tensor expert_ids, str store, int layer) -> Tensor")
LIB.define("expert_store_prefetch.out(Tensor expert_ids, str store, int layer, *, Tensor(a!) out) -> Tensor(a!)")
STORED_ARGS = "Tensor x, Tensor expert_ids, Tensor expert_weights, str store, int layer, str activation"
LIB.define(f"expert_store_moe_ffn({STORED_ARGS}) -> Tensor")
LIB.define(f"expert_store_moe_ffn.out({STORED_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")

EXPERTS_FILE = "experts.bin"
_STORES: dict[str, ExpertFile] = {}


# ------------------------------------------------------------------------------------------ registry (eager)
def register_store(path: str | Path) -> ExpertFile:
    """Open (and check) an experts.bin for the eager references; returns it (its `.id` names it in the graph)."""
    f = ExpertFile(path)
    _STORES[f.id] = f
    return f


def lookup_store(store: str) -> ExpertFile:
    if store not in _STORES:
        raise PocketllmError(f"expert store {store} is not open in this process (register_store(path/experts.bin))")
    return _STORES[store]


# ------------------------------------------------------------------------------------------ writer
def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class ExpertFileWriter:
    """Writes experts.bin expert by expert (whatever order), so that an exporter can free each expert's tensors as
    soon as they are written. Layer entries come first (their shapes fix every offset); `close()` writes the tables
    with the checksums and the header, and returns the store id (derived from the tables: the same weights give the
    same file and id)."""

    def __init__(self, path: str | Path, layers: list[LayerEntry]):
        self.path = Path(path)
        tables = len(layers) * LAYER.size + sum(e.experts for e in layers) * EXPERT.size
        self.data_offset = align(HEADER_BYTES + tables, ALIGNMENT)
        at, self.layers = self.data_offset, []
        for entry in layers:
            _, block = entry.layout()
            stride = align(block, ALIGNMENT)
            self.layers.append(replace(entry, block_bytes=block, block_stride=stride, first_offset=at))
            at += entry.experts * stride
        self.size = at
        self.sums = {e.layer: [None] * e.experts for e in self.layers}
        self.file = open(self.path, "wb")
        self.file.truncate(self.size)  # sparse until written

    def entry(self, layer: int) -> LayerEntry:
        return next(e for e in self.layers if e.layer == layer)

    def write_expert(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: name -> the expert's tensor, as LayerEntry.tensors() names and shapes them (bf16 / fp16 /
        float32 / uint8 as the entry's dtypes say)."""
        entry = self.entry(layer)
        layout, block_bytes = entry.layout()
        block = bytearray(block_bytes)
        for name, dtype, shape, offset in layout:
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise PocketllmError(f"{self.path.name}: layer {layer} expert {expert} {name} has shape "
                                     f"{list(t.shape)}, expected {list(shape)}")
            data = _raw_bytes(t)
            block[offset:offset + len(data)] = data
        self.sums[layer][expert] = checksum(bytes(block))
        self.file.seek(entry.first_offset + expert * entry.block_stride)
        self.file.write(block)

    def close(self) -> str:
        missing = [(l, e) for l, s in self.sums.items() for e, v in enumerate(s) if v is None]
        if missing:
            raise PocketllmError(f"{self.path.name}: layer {missing[0][0]} expert {missing[0][1]} was never written")
        tables = b"".join(e.pack() for e in self.layers)
        tables += b"".join(EXPERT.pack(*s) for e in self.layers for s in self.sums[e.layer])
        store_id = hashlib.sha256(tables).digest()[:16]
        t1, t2 = checksum(tables)
        head = HEADER.pack(MAGIC, VERSION, len(self.layers), ALIGNMENT, 0, self.data_offset, self.size, store_id,
                           t1, t2, len(tables), 0)
        head = head[:120] + fold(*checksum(head[:120])).to_bytes(8, "little")
        self.file.seek(0)
        self.file.write(head + tables)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return store_id.hex()


# ------------------------------------------------------------------------------------------ references
def _torch_arrays(f: ExpertFile, layer: int) -> tuple[str, dict[str, torch.Tensor]]:
    """The layer's stacked tensors as the op's torch references take them (bf16 / fp16 kept, copied)."""
    entry = f.layers[layer]
    dtypes = {name: dtype for name, dtype, _ in entry.tensors()}
    out = {}
    for name, raw in f.stacked(layer).items():
        t = torch.from_numpy(np.ascontiguousarray(raw))
        out[name] = {"bf16": lambda x: x.view(torch.bfloat16), "fp16": lambda x: x.view(torch.float16)}.get(
            dtypes[name], lambda x: x)(t)
    return entry.format, out


def expert_store_moe_ffn_reference(x, expert_ids, expert_weights, store: str, layer: int, activation: str):
    check_routing_args("expert_store_moe_ffn", x, expert_ids, expert_weights, activation)
    f = lookup_store(store)
    if layer not in f.layers:
        raise PocketllmError(f"expert_store_moe_ffn: expert store {store} has no layer {layer}")
    for e in torch.unique(expert_ids).tolist():
        if 0 <= e < f.layers[layer].experts:
            f.verify(layer, e)
    fmt, a = _torch_arrays(f, layer)
    if fmt == "any4":
        names = [f"{p}_{s}" for p in ("gate", "up", "down") for s in ("qweight", "lut", "scales", "zeros")]
        return moe_ffn_any4_reference(x, expert_ids, expert_weights, *(a[n] for n in names), activation)
    return moe_ffn_reference(x, expert_ids, expert_weights, a["gate"], a["up"], a["down_t"], activation)


def _check_prefetch(expert_ids) -> None:
    if expert_ids.dim() != 2 or expert_ids.dtype != torch.int64:
        raise PocketllmError(f"expert_store_prefetch: expert_ids must be int64 [T, k] (got {expert_ids.dtype} "
                             f"{list(expert_ids.shape)})")


# ------------------------------------------------------------------------------------------ registrations
@torch.library.impl(LIB, "expert_store_prefetch", "CompositeExplicitAutograd")
def _expert_store_prefetch(expert_ids, store, layer):
    _check_prefetch(expert_ids)
    return expert_ids.clone()


@torch.library.impl(LIB, "expert_store_prefetch.out", "CompositeExplicitAutograd")
def _expert_store_prefetch_out(expert_ids, store, layer, *, out):
    _check_prefetch(expert_ids)
    out.resize_(expert_ids.shape)
    out.copy_(expert_ids)
    return out


@torch.library.register_fake("pocketllm::expert_store_prefetch")
def _expert_store_prefetch_fake(expert_ids, store, layer):
    _check_prefetch(expert_ids)
    return expert_ids.new_empty(expert_ids.shape)


@torch.library.register_fake("pocketllm::expert_store_prefetch.out")
def _expert_store_prefetch_out_fake(expert_ids, store, layer, *, out):
    return out


@torch.library.impl(LIB, "expert_store_moe_ffn", "CompositeExplicitAutograd")
def _expert_store_moe_ffn(x, expert_ids, expert_weights, store, layer, activation):
    return expert_store_moe_ffn_reference(x, expert_ids, expert_weights, store, layer, activation)


@torch.library.impl(LIB, "expert_store_moe_ffn.out", "CompositeExplicitAutograd")
def _expert_store_moe_ffn_out(x, expert_ids, expert_weights, store, layer, activation, *, out):
    result = expert_store_moe_ffn_reference(x, expert_ids, expert_weights, store, layer, activation)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::expert_store_moe_ffn")
def _expert_store_moe_ffn_fake(x, expert_ids, expert_weights, store, layer, activation):
    check_routing_args("expert_store_moe_ffn", x, expert_ids, expert_weights, activation)
    return x.new_empty(x.shape)


@torch.library.register_fake("pocketllm::expert_store_moe_ffn.out")
def _expert_store_moe_ffn_out_fake(x, expert_ids, expert_weights, store, layer, activation, *, out):
    return out
