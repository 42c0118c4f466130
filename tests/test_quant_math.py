"""Quantization math: nibble order, the any4_linear op on a hand-checkable weight, k-means quality, baselines'
error bounds, bits per weight, and recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.quant_linear import dequantize_packed
from pocketllm.export.quant import any4, int4, int8, nf4
from pocketllm.export.quant.format import TensorQuant
from pocketllm.export.quant.pack import pack_nibbles, unpack_nibbles
from pocketllm.export.quant.recipe import default_recipe
from pocketllm.runtime_py import quant as np_quant


def test_nibble_order_low_first():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(unpack_nibbles(packed), codes)
    assert np.array_equal(np_quant.unpack_codes(packed.numpy()), codes.numpy())


def test_kmeans_recovers_sixteen_separated_values_exactly():
    g = torch.Generator().manual_seed(0)
    values = torch.sort(torch.randperm(30, generator=g)[:16].float() * 0.5, dim=0).values  # >= 0.5 apart in [0, 15)
    rows = torch.stack([values + 0.01 * r for r in range(6)])  # [6, 16]
    idx = torch.randint(0, 16, (6, 300), generator=g)
    idx[:, :16] = torch.arange(16)
    x = rows.gather(1, idx)
    c = any4.weighted_kmeans_1d(x, torch.rand(x.shape, generator=g) + 0.1)
    assert torch.allclose(c, rows, atol=1e-5)


def kmeans_objective(x, w, c):
    return float((w * ((x[:, None] - c[None, :]) ** 2).min(axis=1)).sum())


def test_kmeans_close_to_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 512, generator=g) * 2.5 + 7.5).clamp(0, 15)
    w = torch.rand(4, 512, generator=g)
    ours = any4.weighted_kmeans_1d(x, w).double().numpy()
    ratios = []
    for i in range(4):
        xi, wi = x[i].double().numpy(), w[i].double().numpy()
        km = sklearn_cluster.KMeans(16, n_init=4, random_state=0).fit(xi[:, None], sample_weight=wi)
        ratios.append(kmeans_objective(xi, wi, ours[i]) / kmeans_objective(xi, wi, km.cluster_centers_[:, 0]))
    assert np.mean(ratios) < 1.06 and max(ratios) < 1.15, ratios


def test_any4_quantize_round_trip_and_weighting():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 256, generator=g) * 0.05
    packed = any4.quantize(w, 64)
    assert packed["qweight"].shape == (48, 128) and packed["lut"].shape == (48, 16)
    assert packed["scales"].shape == packed["zeros"].shape == (48, 4)
    assert bool((packed["lut"][:, 1:] >= packed["lut"][:, :-1]).all())  # ascending per row
    rel = float((dequantize_packed(TensorQuant("any4", 64), packed, 256) - w).norm() / w.norm())
    rel_int4 = float((dequantize_packed(TensorQuant("int4", 64), int4.quantize(w, 64), 256) - w).norm() / w.norm())
    assert rel < 0.9 * rel_int4  # a learned per-row LUT beats the uniform grid on Gaussian weights
    # Columns with large calibration weight are reproduced better than when they are ignored.
    col = torch.ones(256)
    col[:32] = 100.0
    err_weighted = (dequantize_packed(TensorQuant("any4", 64), any4.quantize(w, 64, col), 256) - w)[:, :32].norm()
    err_plain = (dequantize_packed(TensorQuant("any4", 64), packed, 256) - w)[:, :32].norm()
    assert err_weighted < err_plain


def test_any4_lut_entries_are_exact_in_fp16_and_bf16():
    """The LUT is stored fp16 but rounded to bf16 precision, so `.pte` export can carry it as bf16 losslessly (the
    CPU kernel's fast path); rounding costs at most 2^-9 relative per entry and codes follow the rounded LUT."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 0.02
    lut = any4.quantize(w, 128)["lut"].float()
    assert torch.equal(lut.to(torch.bfloat16).float(), lut)
    v = torch.tensor([7.123456, -3.3, 1e-6, -2.0 ** -15, 0.0, 2.0 ** -14])
    r = any4.lut_grid(v)
    assert torch.equal(r.to(torch.bfloat16).float(), r) and torch.equal(r.half().float(), r)
    assert r[2] == 0 and r[3] == 0 and r[5] == 2.0 ** -14
    big = v.abs() >= 2.0 ** -14
    assert bool(((r - v).abs() <= v.abs() * 2.0 ** -9)[big].all()) and bool(((r - v).abs() < 2.0 ** -14)[~big].all())


def test_export_carries_lossless_luts_as_bf16():
    from pocketllm.export.nn.quant_linear import Any4Linear
    from pocketllm.export.targets.executorch.swaps import any4_luts_to_bf16

    g = torch.Generator().manual_seed(4)
    layers = torch.nn.ModuleList([Any4Linear(64, 8, TensorQuant("any4", 32)) for _ in range(2)])
    for m in layers:
        for name, value in any4.quantize(torch.randn(8, 64, generator=g), 32).items():
            setattr(m, name, value)
    layers[1].lut[0, 0] = 0.1  # not a bf16 value: this layer keeps its fp16 LUT
    x = torch.randn(3, 64, generator=g)
    before = [m(x) for m in layers]
    assert any4_luts_to_bf16(layers) == {"bf16": 1, "fp16": 1}
    assert layers[0].lut.dtype == torch.bfloat16 and layers[1].lut.dtype == torch.float16
    assert "lut" in dict(layers[0].named_buffers())
    for m, y in zip(layers, before):
        assert torch.equal(m(x), y)


def test_baseline_error_bounds():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    q = int4.quantize(w, 32)
    s = q["scales"].float().repeat_interleave(32, dim=1)
    err = (dequantize_packed(TensorQuant("int4", 32), q, 128) - w).abs()
    assert bool((err <= 0.5 * s * 1.01 + 1e-3 * w.abs()).all())  # half a step (+ fp16 rounding of zero)
    q = int8.quantize(w)
    err = (dequantize_packed(TensorQuant("int8"), q, 128) - w).abs()
    assert bool((err <= 0.5 * q["scales"].float() * 1.01).all())
    q = nf4.quantize(w, 32)
    x = w / q["scales"].float().repeat_interleave(32, dim=1)
    table = torch.tensor(nf4.NF4)
    best = (x[..., None] - table).abs().argmin(-1)  # the nearest NF4 value, by brute force
    assert torch.equal(unpack_nibbles(q["qweight"]), best)


def test_nf4_table_is_qlora_normal_float():
    stats = pytest.importorskip("scipy.stats")
    offset = 0.9677083
    pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v = v / v.max()
    assert np.abs(v - np.array(nf4.NF4)).max() < 1e-6
    assert np.array_equal(np_quant.NF4, np.array(nf4.NF4, dtype=np.float32))


@pytest.mark.parametrize("scheme,g,K,bits", [
    ("any4", 128, 4096, 4 + 32 / 128 + 256 / 4096),  # 4.3125 (the paper's 4.31)
    ("any4", 0, 4096, 4 + 288 / 4096),
    ("int4", 128, 4096, 4.25),
    ("nf4", 128, 4096, 4.125),
    ("int8", 0, 4096, 8 + 16 / 4096),
])
def test_bits_per_weight(scheme, g, K, bits):
    assert TensorQuant(scheme, g).bits_per_weight(1024, K) == pytest.approx(bits)


def test_default_recipe_first_match_wins():
    r = default_recipe("any4")
    assert r.resolve("model.layers.3.mlp.down_proj") == TensorQuant("any4", 128)
    assert r.resolve("model.layers.3.block_sparse_moe.experts.2.gate") == TensorQuant("any4", 128)
    for kept in ("lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe.primary_router",
                 "model.layers.0.block_sparse_moe.gate"):
        assert r.resolve(kept) is None
    assert default_recipe("any4", quantize_lm_head=True).resolve("lm_head") == TensorQuant("any4", 128)
    assert default_recipe("int8").resolve("model.layers.0.mlp.up_proj") == TensorQuant("int8", 0)
    with pytest.raises(PocketllmError, match="unknown --scheme 'fp3'"):
        default_recipe("fp3")
    with pytest.raises(PocketllmError, match="int8 is per output channel"):
        default_recipe("int8", 64)
