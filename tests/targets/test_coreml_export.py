"""Core ML target: what the saved `.mlpackage` is, read back from disk with coremltools on Linux (no predict here).

Two layers of checks:
- the MIL builders of export/targets/coreml/ops.py on small programs built directly (quantized linears in every
  scheme vs the checkpoint's dequantization, InfLLM v2 composite vs the reference op and a brute-force upstream rule,
  lightning with padding vs the reference op);
- whole exports of tiny presets of the three families (MiniCPM4 dense and with InfLLM v2 engaged, any4; SmallThinker
  NoPE + sliding window + MoE, int4; MiniMax lightning + softmax, int8): the package loads back, its interface is the
  manifest entry, every cache is a state, every quantized linear reads a constexpr op, every op is in the iOS 18
  opset, and the program (run by the small evaluator in tests/targets/mil_eval.py) matches the numpy reference.
Exports happen once per module (~30-60 s each on two busy cores).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.errors import PocketllmError
from export.presets import preset_config
from tests.targets.mil_eval import CoreMLProgramRunner, MILEvaluator

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_CONTEXT = 320
CHUNK = 32


# ---------------------------------------------------------------------------------------------- MIL builders
def build(fn, specs: dict[str, tuple]):
    """A one-function iOS 18 MIL program from a builder function over named fp32/int32 inputs."""
    from coremltools.converters.mil.mil import Function, Program, types

    placeholders = {name: mb.placeholder(shape=shape, dtype=types.int32 if dt == "int32" else types.fp32)
                    for name, (shape, dt) in specs.items()}
    with Function(placeholders, opset_version=ct.target.iOS18) as func:
        outs = fn(*[func.inputs[name] for name in specs])
        func.set_outputs(list(outs) if isinstance(outs, tuple) else [outs])
    prog = Program()
    prog.add_function("main", func)
    return prog, {name: name for name in specs}


def run(prog, names, **inputs):
    ev = MILEvaluator(prog, "fp32")
    outs = ev.run("main", {names[k]: v for k, v in inputs.items()})
    return list(outs.values())


@pytest.mark.parametrize("scheme,group", [("any4", 32), ("any4", 0), ("int4", 32), ("nf4", 32), ("int8", 0)])
def test_quantized_linear_is_the_checkpoints_weight(scheme, group):
    """y = x W^T with W exactly the checkpoint's dequantized weight (up to fp16 rounding), stored compressed."""
    from export.nn.quant_linear import dequantize_packed
    from export.quant.format import TensorQuant
    from export.quant.quantize import quantize_tensor
    from export.targets.coreml.ops import quantized_linear_mil, quantized_weight_arrays, weight_bits

    torch.manual_seed(0)
    N, K = 48, 128
    tq = TensorQuant(scheme, group)
    packed = quantize_tensor(torch.randn(N, K) * 0.05, tq)
    w = dequantize_packed(tq, packed, K).numpy()
    order = {"any4": ("qweight", "lut", "scales", "zeros"), "int4": ("qweight", "scales", "zeros"),
             "nf4": ("qweight", "scales"), "int8": ("qweight", "scales")}[scheme]
    tensors = [packed[n].numpy() for n in order]
    g = tq.group(K)
    x = np.random.default_rng(0).standard_normal((1, 5, K)).astype(np.float32)
    prog, names = build(lambda x: quantized_linear_mil(x, scheme, g, tensors, "lin"), {"x": ((1, 5, K), "fp32")})
    (y,) = run(prog, names, x=x)
    w16 = w.astype(np.float16).astype(np.float32)  # the finest the fp16 package can hold
    np.testing.assert_allclose(y, x @ w16.T, atol=2e-3, rtol=1e-3)
    ops = [op.op_type for op in prog.functions["main"].operations]
    assert ("constexpr_lut_to_dense" if scheme in ("any4", "nf4") else "constexpr_blockwise_shift_scale") in ops
    # stored bits: the checkpoint's own (docs/quantization.md), except nf4's one shared 16-entry table
    arrays = quantized_weight_arrays(scheme, g, tensors)
    expected = tq.bits_per_weight(N, K) if scheme != "nf4" else 4 + 16 / g + 256 / (N * K)
    assert weight_bits(arrays) / (N * K) == pytest.approx(expected)


def brute_force_selection(q, k, start, p, rule):
    """Selected blocks [Hkv, T, NB] by a per-query loop (docs/infllm_v2.md; rule "upstream_lse" normalises with the
    log-sum-exp over coarse kernels of size 4k / stride 4s, the fine kernels' LSE before any coarse one exists)."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    ks, st, bs = p["kernel_size"], p["kernel_stride"], p["block_size"]
    nb = -(-L // bs)
    local = p["window_size"] // bs
    out = np.zeros((Hkv, T, nb), dtype=bool)

    def means(size, stride):
        n = (L - size) // stride + 1 if L >= size else 0
        return np.stack([k[stride * j:stride * j + size].mean(0) for j in range(n)]) if n else np.zeros((0, Hkv, D))

    kc1, kc2 = means(ks, st), means(4 * ks, 4 * st)
    for t in range(T):
        i = start + t
        b_q = i // bs
        vis1 = [j for j in range(len(kc1)) if st * j + ks - 1 <= i]
        vis2 = [j for j in range(len(kc2)) if 4 * st * j + 4 * ks - 1 <= i]
        for h in range(Hkv):
            score = np.zeros(len(kc1))
            for g in range(G):
                qv = q[t, h * G + g] / math.sqrt(D)
                l1 = np.array([qv @ kc1[j, h] for j in vis1])
                if rule == "upstream_lse" and vis2:
                    l2 = np.array([qv @ kc2[j, h] for j in vis2])
                    lse = np.log(np.exp(l2 - l2.max()).sum()) + l2.max()
                else:
                    lse = np.log(np.exp(l1 - l1.max()).sum()) + l1.max() if len(l1) else 0
                for n, j in enumerate(vis1):
                    score[j] += np.exp(l1[n] - lse)
            bscore = {}
            for b in range(b_q + 1):
                touching = [j for j in vis1 if st * j <= bs * b + bs - 1 and st * j + ks - 1 >= bs * b]
                if touching:
                    bscore[b] = max(score[j] for j in touching)
            forced = {b for b in range(b_q + 1) if b < p["init_blocks"] or b >= b_q - local}
            cands = sorted((b for b in bscore if b not in forced), key=lambda b: (-bscore[b], b))
            slots = max(p["topk"] + local - len(forced), 0)
            for b in forced | set(cands[:slots]):
                out[h, t, b] = True
    return out


def attention_with_selection(q, k, v, start, sel, bs):
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    out = np.zeros_like(q)
    for t in range(T):
        for hq in range(Hq):
            h = hq // G
            keys = [l for l in range(start + t + 1) if sel[h, t, l // bs]]
            s = np.array([q[t, hq] @ k[l, h] for l in keys]) / math.sqrt(D)
            w = np.exp(s - s.max())
            out[t, hq] = (w / w.sum()) @ v[keys, h]
    return out


SPARSE = dict(kernel_size=32, kernel_stride=16, block_size=32, init_blocks=1, window_size=32, topk=4, dense_len=-1)


@pytest.mark.parametrize("rule", ["exact_softmax", "upstream_lse"])
@pytest.mark.parametrize("T,start,n_valid,dense_len", [(24, 200, 24, -1), (24, 230, 17, -1), (1, 250, 1, -1),
                                                       (1, 270, 1, -1), (24, 220, 10, 240), (24, 220, 20, 240)])
def test_infllm_composite(rule, T, start, n_valid, dense_len):
    """The composite over a static cache (padding after n_valid rows, compressed keys from a state that holds the
    earlier kernels) selects exactly the brute-force blocks and attends like it; exact_softmax also equals the
    shared reference op. dense_len: the real length (start + n_valid, not start + T) decides the dense fallback."""
    from export.ops.infllm_attention import infllm_attention_reference
    from export.targets.coreml.ops import infllm_attention_mil, update_compressed_keys_mil
    from export.targets.coreml.swaps import kernel_count

    p = dict(SPARSE, dense_len=dense_len)
    S, Hq, Hkv, D = 288, 4, 2, 16
    NK = kernel_count(S, 32, 16)
    rng = np.random.default_rng(T + start)
    k = rng.standard_normal((1, S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((1, S, Hkv, D)).astype(np.float32)
    q = rng.standard_normal((1, T, Hq, D)).astype(np.float32) * np.array([4, 0.5, 4, 0.5], np.float32)[:, None]
    L = start + n_valid
    kc = np.zeros((1, NK, Hkv, D), np.float32)
    for j in range(NK):  # the state holds every kernel complete before this call; later rows are stale garbage
        kc[0, j] = k[0, 16 * j:16 * j + 32].mean(0) if 16 * j + 31 < start else 7.0

    def fn(q, kk, vv, kc, start, n):
        s0, n0 = mb.squeeze(x=start), mb.squeeze(x=n)
        kc_new = update_compressed_keys_mil(kk, kc, s0, T, 32, 16)
        return infllm_attention_mil(q, kk, vv, kc_new, s0, n0, p, rule, "out"), kc_new

    prog, names = build(fn, {"q": (q.shape, "fp32"), "k": (k.shape, "fp32"), "v": (v.shape, "fp32"),
                             "kc": (kc.shape, "fp32"), "start": ((1,), "int32"), "n": ((1,), "int32")})
    out, kc_new = run(prog, names, q=q, k=k, v=v, kc=kc, start=np.int32([start]), n=np.int32([n_valid]))
    for j in range(NK):
        if 16 * j + 31 < L:  # every kernel complete after the call is in the state
            np.testing.assert_allclose(kc_new[0, j], k[0, 16 * j:16 * j + 32].mean(0), atol=1e-5)
    dense = dense_len != -1 and L < dense_len
    sel = brute_force_selection(q[0, :n_valid], k[0, :L], start, p, rule)
    if dense:
        sel[:] = True
    else:
        assert not sel.all(), "the case must drop blocks"
    want = attention_with_selection(q[0, :n_valid], k[0], v[0], start, sel, p["block_size"])
    np.testing.assert_allclose(out[0, :n_valid], want, atol=2e-5)
    if rule == "exact_softmax":
        ref = infllm_attention_reference(torch.from_numpy(q[:, :n_valid]), torch.from_numpy(k), torch.from_numpy(v),
                                         start, 32, 16, 32, 1, 32, 4, dense_len)
        np.testing.assert_allclose(out[0, :n_valid], ref[0].numpy(), atol=2e-5)


def test_infllm_rules_differ():
    """The two scoring rules select differently once the heads of a group disagree in scale (the per-head
    normaliser then reweights them), so the variant test above tells them apart."""
    p = SPARSE
    rng = np.random.default_rng(0)
    k = rng.standard_normal((280, 2, 16)).astype(np.float32)
    q = rng.standard_normal((24, 4, 16)).astype(np.float32) * np.array([4, 0.5, 4, 0.5], np.float32)[None, :, None]
    a = brute_force_selection(q, k, 256, p, "exact_softmax")
    b = brute_force_selection(q, k, 256, p, "upstream_lse")
    assert (a != b).any()


def test_lightning_padding_leaves_state_alone():
    """Padded rows after n_valid neither decay nor feed the state: the state after a padded chunk is the reference
    state after the real rows only; the outputs of the real rows match too."""
    from export.ops.lightning_attention import lightning_attention_reference, lightning_decay_rates
    from export.targets.coreml.ops import lightning_attention_mil

    B, T, H, D, n = 1, 20, 4, 8, 13
    rng = np.random.default_rng(1)
    q, k, v = (np.abs(rng.standard_normal((B, T, H, D))).astype(np.float32) for _ in range(3))
    state = rng.standard_normal((B, H, D, D)).astype(np.float32)
    decay = lightning_decay_rates(H, 1, 4).numpy()

    def fn(q, k, v, s, n_valid):
        return lightning_attention_mil(q, k, v, s, decay, 8, mb.squeeze(x=n_valid), "out")

    prog, names = build(fn, {"q": (q.shape, "fp32"), "k": (k.shape, "fp32"), "v": (v.shape, "fp32"),
                             "s": (state.shape, "fp32"), "n": ((1,), "int32")})
    out, new_state = run(prog, names, q=q, k=k, v=v, s=state, n=np.int32([n]))
    ref_out, ref_state = lightning_attention_reference(*(torch.from_numpy(a[:, :n]) for a in (q, k, v)),
                                                       torch.from_numpy(state), torch.from_numpy(decay), 8)
    np.testing.assert_allclose(out[:, :n], ref_out.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_state, ref_state.numpy(), rtol=1e-4, atol=1e-4)
