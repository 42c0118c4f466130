"""The expert store: experts.bin as export/ops/expert_store.py writes it, read by the numpy twin
(runtime_py/ops/expert_store.py) and by the kernel library's store (kernels/expert_store.cpp, through its C entry
points), and the two ops over it (pocketllm::expert_store_prefetch, pocketllm::expert_store_moe_ffn).

The stored op is moe_ffn's kernel on the experts where the store holds them, so it must equal the stacked op bit for
bit, with or without a budget (a budget splits a prefill into batches of experts that accumulate in order). The
store's own behaviour is observable through its statistics: hits, misses, evictions of the LRU under a budget,
loads started by a prefetch from the routing. A truncated or corrupt file is refused with one line.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.expert_store import ExpertFileWriter, register_store
from pocketllm.runtime_py.ops import expert_store as np_store
from pocketllm.runtime_py.ops.expert_store import HEADER_BYTES, ExpertFile, LayerEntry
from tests.ops.test_moe_ffn import (ACTIVATION_CODE, any4_experts, close, float_experts, kernel_any4, kernel_float,
                                    ptr, routing)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

I = ctypes.c_int64
ANY4_NAMES = [f"{p}_{s}" for p in ("gate", "up", "down") for s in ("qweight", "lut", "scales", "zeros")]
STATS = ("hits", "prefetch_hits", "waits", "misses", "prefetch_loads", "evictions", "bytes_read", "resident_bytes",
         "peak_resident_bytes", "slots", "load_ns")


@pytest.fixture(scope="module")
def kernels() -> ctypes.CDLL:
    from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY, load_kernel_library
    from tests.kernels import build_kernels

    build_kernels()
    load_kernel_library(needed=["pocketllm::expert_store_moe_ffn.out", "pocketllm::expert_store_prefetch.out"])
    return ctypes.CDLL(str(DEFAULT_KERNEL_LIBRARY))


# ------------------------------------------------------------------------------------------ files
E, F, H = 6, 32, 64


def layer_weights(fmt: str, seed: int, E_: int = E) -> dict[str, torch.Tensor]:
    """Stacked weights [E, ...] of one layer, by the op's argument names."""
    gen = torch.Generator().manual_seed(seed)
    if fmt == "any4":
        return dict(zip(ANY4_NAMES, any4_experts(E_, F, H, 32, 16, gen)))
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    return dict(zip(("gate", "up", "down_t"), float_experts(E_, F, H, dtype, gen)))


def entry_for(layer: int, fmt: str, w: dict[str, torch.Tensor]) -> LayerEntry:
    E_ = next(iter(w.values())).shape[0]
    if fmt != "any4":
        return LayerEntry(layer, fmt, E_, F, H)
    return LayerEntry(layer, "any4", E_, F, H, w["gate_scales"].shape[2], w["up_scales"].shape[2],
                      w["down_scales"].shape[2], "bf16", "fp16")


def write_store(path, layers: dict[int, tuple[str, dict[str, torch.Tensor]]]):
    """layers: model layer -> (format, stacked weights). Experts are written in a scrambled order (the writer
    places them by index). Returns the store id."""
    writer = ExpertFileWriter(path, [entry_for(l, fmt, w) for l, (fmt, w) in layers.items()])
    for layer, (fmt, w) in layers.items():
        n = next(iter(w.values())).shape[0]
        for e in reversed(range(n)):
            writer.write_expert(layer, e, {k: v[e] for k, v in w.items()})
    return writer.close()


class Store:
    """A store opened in the kernel library (ctypes)."""

    def __init__(self, lib, path, budget_bytes=0, prefetch=False):
        ident, err = ctypes.create_string_buffer(33), ctypes.create_string_buffer(512)
        self.lib = lib
        if not lib.pocketllm_expert_store_open(str(path).encode(), I(budget_bytes), I(int(prefetch)), ident, err,
                                               I(512)):
            raise PocketllmError(err.value.decode())
        self.id = ident.value

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_int64 * len(STATS))()
        assert self.lib.pocketllm_expert_store_stats(self.id, out)
        return dict(zip(STATS, out))

    def prefetch(self, ids: torch.Tensor, layer: int) -> None:
        err = ctypes.create_string_buffer(512)
        assert self.lib.pocketllm_expert_store_prefetch(ptr(ids), I(ids.shape[0]), I(ids.shape[1]), self.id, I(layer),
                                                        err, I(512)), err.value
        self.lib.pocketllm_expert_store_drain(self.id)

    def moe(self, x, ids, w, layer, activation="reglu") -> torch.Tensor:
        out = torch.full(x.shape, float("nan"))
        err = ctypes.create_string_buffer(512)
        ok = self.lib.pocketllm_expert_store_moe_ffn(ptr(x), ptr(ids), ptr(w), I(x.shape[0]), I(ids.shape[1]),
                                               I(x.shape[1]), self.id, I(layer), I(ACTIVATION_CODE[activation]),
                                               ptr(out), err, I(512))
        if not ok:
            raise PocketllmError(err.value.decode())
        return out


def slot_bytes(entry: LayerEntry) -> int:
    """One slot of the store's cache: an expert block rounded up to whole 4 KiB pages (kernels/expert_store.cpp)."""
    return (entry.block_bytes + 4095) // 4096 * 4096


def stacked_kernel(lib, fmt, w, x, ids, wts, activation):
    if fmt == "any4":
        return kernel_any4(lib, x, ids, wts, [w[n] for n in ANY4_NAMES], activation)
    return kernel_float(lib, x, ids, wts, w["gate"], w["up"], w["down_t"], activation)


# ------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "any4"])
def test_numpy_reader_gives_back_what_was_written(tmp_path, fmt):
    w = layer_weights(fmt, 1)
    write_store(tmp_path / "experts.bin", {3: (fmt, w)})
    f = ExpertFile(tmp_path / "experts.bin")
    assert list(f.layers) == [3] and f.layers[3].format == fmt
    assert f.layers[3].first_offset % 16384 == 0 and f.layers[3].block_stride % 16384 == 0
    raw = f.stacked(3)
    for name, t in w.items():
        expect = t.view(torch.int16).numpy().view(np.uint16) if t.dtype in (torch.bfloat16, torch.float16) \
            else t.numpy()
        assert np.array_equal(raw[name], expect), name
    for e in range(E):
        f.verify(3, e)


def test_same_weights_give_the_same_file_and_id(tmp_path):
    w = layer_weights("any4", 2)
    a = write_store(tmp_path / "a.bin", {0: ("any4", w)})
    b = write_store(tmp_path / "b.bin", {0: ("any4", w)})
    assert a == b and (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


# ------------------------------------------------------------------------------------------ the stored op
@pytest.mark.parametrize("budget_slots", [0, 2, 5], ids=["unbounded", "2-slots", "5-slots"])
@pytest.mark.parametrize("fmt,activation", [("fp32", "swiglu"), ("bf16", "reglu"), ("any4", "reglu")])
def test_stored_op_equals_stacked_op_bit_for_bit(kernels, tmp_path, fmt, activation, budget_slots):
    """Decode (T = 1) and prefill (T = 29, every expert of the layer routed: with 2 or 5 slots the call runs in
    batches that accumulate) through the store, with the helper prefetching, equal the stacked kernel exactly; the
    torch reference and the numpy twin on the file agree with it."""
    layers = {0: (fmt, layer_weights(fmt, 3)), 5: (fmt, layer_weights(fmt, 4))}
    path = tmp_path / "experts.bin"
    write_store(path, layers)
    block = slot_bytes(ExpertFile(path).layers[0])
    store = Store(kernels, path, budget_slots * block, prefetch=True)
    gen = torch.Generator().manual_seed(7)
    for T in (1, 29, 1):
        x = torch.randn(T, H, generator=gen)
        ids, wts = routing(T, 3, E, E, gen)
        for layer, (_, w) in layers.items():
            store.prefetch(ids, layer)
            got = store.moe(x, ids, wts, layer, activation)
            assert torch.equal(got, stacked_kernel(kernels, fmt, w, x, ids, wts, activation))
            f = register_store(path)
            close(torch.ops.pocketllm.expert_store_moe_ffn(x, ids, wts, f.id, layer, activation), got)
            close(torch.from_numpy(np_store.expert_store_moe_ffn(x.numpy(), ids.numpy(), wts.numpy(), f, layer,
                                                           activation)), got)
    stats = store.stats()
    if budget_slots:
        assert stats["slots"] == budget_slots and stats["peak_resident_bytes"] <= budget_slots * block
        assert stats["evictions"] > 0
    else:
        assert stats["slots"] == 0 and stats["resident_bytes"] <= 2 * E * block


def test_lru_under_a_budget(kernels, tmp_path):
    """Two slots, no prefetch: decode calls on experts 0, 1, 0, 2, 1, 2 -> miss, miss, hit, miss (evicts 1, the least
    recently used), miss (evicts 0), hit."""
    w = layer_weights("bf16", 5)
    path = tmp_path / "experts.bin"
    write_store(path, {1: ("bf16", w)})
    entry = ExpertFile(path).layers[1]
    store = Store(kernels, path, 2 * slot_bytes(entry) + 100)
    x = torch.randn(1, H)
    expected = [(0, 1, 0), (0, 2, 0), (1, 2, 0), (1, 3, 1), (1, 4, 2), (2, 4, 2)]  # hits, misses, evictions
    for e, (hits, misses, evictions) in zip([0, 1, 0, 2, 1, 2], expected):
        out = store.moe(x, torch.tensor([[e]]), torch.ones(1, 1), 1)
        assert torch.equal(out, stacked_kernel(kernels, "bf16", w, x, torch.tensor([[e]]), torch.ones(1, 1), "reglu"))
        s = store.stats()
        assert (s["hits"], s["misses"], s["evictions"]) == (hits, misses, evictions), (e, s)
        assert s["resident_bytes"] <= 2 * entry.block_bytes and s["slots"] == 2
    assert store.stats()["bytes_read"] == 4 * entry.block_bytes


@pytest.mark.parametrize("budget", [True, False], ids=["budget", "unbounded"])
def test_prefetch_from_routing(kernels, tmp_path, budget):
    """expert_store_prefetch with the router's choice loads those experts on the helper thread (slots, or the mapping's
    pages); the MoE call that follows finds all of them resident."""
    w = layer_weights("any4", 6)
    path = tmp_path / "experts.bin"
    write_store(path, {2: ("any4", w)})
    store = Store(kernels, path, 4 * slot_bytes(ExpertFile(path).layers[2]) if budget else 0, prefetch=True)
    ids = torch.tensor([[4, 1], [1, 5]])
    store.prefetch(ids, 2)
    s = store.stats()
    assert s["prefetch_loads"] == 3 and s["misses"] == 0 and s["hits"] == 0
    x = torch.randn(2, H)
    wts = torch.full((2, 2), 0.5)
    out = store.moe(x, ids, wts, 2)
    assert torch.equal(out, stacked_kernel(kernels, "any4", w, x, ids, wts, "reglu"))
    s = store.stats()
    assert s["hits"] == 3 and s["misses"] == 0
    if budget:
        assert s["prefetch_hits"] == 3
    store.prefetch(torch.tensor([[0, 1]]), 2)  # 1 is resident already: only 0 is read
    assert store.stats()["prefetch_loads"] == 4


def test_a_store_is_found_through_the_environment(kernels, tmp_path, monkeypatch):
    """An op naming a store nobody opened opens $POCKETLLM_EXPERT_STORE (what ExecuTorch's stock runner relies on),
    with $POCKETLLM_EXPERT_CACHE_MB as its budget; another bundle's file there is refused."""
    w = layer_weights("fp32", 8)
    path = tmp_path / "experts.bin"
    store_id = write_store(path, {0: ("fp32", w)}).encode()
    monkeypatch.setenv("POCKETLLM_EXPERT_STORE", str(path))
    monkeypatch.setenv("POCKETLLM_EXPERT_CACHE_MB", "1")
    kernels.pocketllm_expert_store_close(store_id)
    store = Store.__new__(Store)
    store.lib, store.id = kernels, store_id
    x = torch.randn(1, H)
    ids, wts = torch.tensor([[2, 3]]), torch.full((1, 2), 0.5)
    assert torch.equal(store.moe(x, ids, wts, 0), stacked_kernel(kernels, "fp32", w, x, ids, wts, "reglu"))
    assert store.stats()["slots"] == (1 << 20) // slot_bytes(ExpertFile(path).layers[0])
    other = Store.__new__(Store)
    other.lib, other.id = kernels, b"0" * 32
    with pytest.raises(PocketllmError, match=r"expert store 0{32} is not open \(POCKETLLM_EXPERT_STORE=.* is store"):
        other.moe(x, ids, wts, 0)


# ------------------------------------------------------------------------------------------ bad files
def corrupt(path, offset: int, size: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    if size is not None:
        data = data[:size]
    else:
        data[offset] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda p, f: corrupt(p, 0, p.stat().st_size - 5000), r"experts\.bin: truncated expert store \(\d+ bytes; its "
                                                           r"header says \d+\); re-export the bundle"),
    (lambda p, f: corrupt(p, 0, 100), r"experts\.bin: truncated expert store \(100 bytes; the header alone is 128\)"),
    (lambda p, f: corrupt(p, 2), r"experts\.bin: not a pocketllm expert store \(bad magic\)"),
    (lambda p, f: corrupt(p, 33), r"experts\.bin: corrupt expert store header \(checksum mismatch\)"),
    (lambda p, f: corrupt(p, HEADER_BYTES + 70), r"experts\.bin: corrupt expert store tables \(checksum mismatch\)"),
], ids=["truncated", "shorter-than-header", "magic", "header", "tables"])
def test_damaged_file_is_refused_with_one_line(kernels, tmp_path, damage, message):
    """The kernel library and the numpy twin refuse the same damage with the same line, when the store opens."""
    path = tmp_path / "experts.bin"
    write_store(path, {0: ("any4", layer_weights("any4", 9))})
    damage(path, ExpertFile(path))
    for opener in (lambda: Store(kernels, path), lambda: ExpertFile(path)):
        with pytest.raises(PocketllmError, match=message) as e:
            opener()
        assert "\n" not in str(e.value)


def test_corrupt_expert_block_is_refused_when_first_read(kernels, tmp_path):
    """A flipped byte inside expert 4's block passes the open (blocks are checked as they are first read) and fails
    the first call routed to expert 4, in both modes; other experts still run."""
    path = tmp_path / "experts.bin"
    w = layer_weights("bf16", 10)
    write_store(path, {7: ("bf16", w)})
    entry = ExpertFile(path).layers[7]
    corrupt(path, entry.first_offset + 4 * entry.block_stride + 1000)
    x, wts = torch.randn(1, H), torch.ones(1, 1)
    for budget in (0, 3 * slot_bytes(entry)):
        store = Store(kernels, path, budget, prefetch=True)
        assert torch.equal(store.moe(x, torch.tensor([[2]]), wts, 7),
                           stacked_kernel(kernels, "bf16", w, x, torch.tensor([[2]]), wts, "reglu"))
        store.prefetch(torch.tensor([[4]]), 7)
        with pytest.raises(PocketllmError, match=r"^experts\.bin: layer 7 expert 4 fails its checksum \(the file is "
                                                 r"corrupt\); re-export the bundle$"):
            store.moe(x, torch.tensor([[4]]), wts, 7)
    f = register_store(path)
    with pytest.raises(PocketllmError, match="layer 7 expert 4 fails its checksum"):
        torch.ops.pocketllm.expert_store_moe_ffn(x, torch.tensor([[4]]), wts, f.id, 7, "reglu")


def test_budget_smaller_than_one_expert_and_missing_layer(kernels, tmp_path):
    path = tmp_path / "experts.bin"
    write_store(path, {0: ("fp32", layer_weights("fp32", 11))})
    with pytest.raises(PocketllmError, match=r"an expert cache of 0 MiB holds no expert \(one expert takes 1 MiB\)"):
        Store(kernels, path, 1000)
    store = Store(kernels, path)
    with pytest.raises(PocketllmError, match="the expert store has no layer 3"):
        store.moe(torch.randn(1, H), torch.tensor([[0]]), torch.ones(1, 1), 3)
    with pytest.raises(PocketllmError, match=r"expert_ids must lie in \[0, 6\)"):
        store.moe(torch.randn(1, H), torch.tensor([[6]]), torch.ones(1, 1), 0)
    with pytest.raises(PocketllmError, match="cannot open expert store"):
        Store(kernels, tmp_path / "missing.bin")
    assert os.path.exists(path)
