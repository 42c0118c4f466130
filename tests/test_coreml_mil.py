"""Core ML target, below a whole export: the MIL builders of export/targets/coreml/converters.py on small programs,
and the swapped torch model (export/targets/coreml/swaps.py) in eager mode.

- Each builder program is saved as an .mlpackage (no graph passes) and run by the product interpreter
  (runtime_py/runners/coreml, fp32 mode): quantized linears in every scheme against the checkpoint's dequantized
  weight, InfLLM v2's composite (compressed-key state, block selection, dense fallback from the real token count,
  decode gather) against a brute-force selection of both score rules and against the shared reference op,
  lightning's block form against the reference op.
- The swapped model, driven like the package (fixed-size prefill chunks padded with id -1, one-token decode, a
  rewind, a new sequence), computes the eager model's logits for the three families.
Whole exports, parity and the saved program's contents: tests/test_coreml_export.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- programs
def build(cases: dict[str, tuple]):
    """One iOS 18 MIL function "main" holding several independent sub-programs. cases: name -> (fn, {input: (shape,
    dtype)}); fn(*inputs) returns one var or a tuple. Outputs are named "<case>:<i>"."""
    from coremltools.converters.mil.mil import Function, Program, types

    placeholders, order = {}, []
    for case, (_, specs) in cases.items():
        for name, (shape, dt) in specs.items():
            placeholders[f"{case}_{name}"] = mb.placeholder(shape=shape, dtype=types.int32 if dt == "int32" else
                                                            types.fp32)
    with Function(placeholders, opset_version=ct.target.iOS18) as func:
        outs = []
        for case, (fn, specs) in cases.items():
            result = fn(*[func.inputs[f"{case}_{name}"] for name in specs])
            result = result if isinstance(result, tuple) else (result,)
            for i, var in enumerate(result):
                outs.append(mb.identity(x=var, name=f"{case}__{i}"))
                order.append((case, i))
        func.set_outputs(outs)
    prog = Program()
    prog.add_function("main", func)
    return prog


def run_saved(tmp_path, cases: dict[str, tuple], feeds: dict[str, dict[str, np.ndarray]]):
    """Save the program as the export does (fp16 precision, coremltools' default passes), run it with the product
    interpreter in fp32 mode (the program's math; fp16 constants exact) -> ({case: [outputs]}, saved op types)."""
    from pocketllm.export.targets.coreml.lower import quiet_coremltools
    from pocketllm.runtime_py.runners.coreml import Interpreter

    path = tmp_path / "p.mlpackage"
    with quiet_coremltools():
        ct.convert(build(cases), minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
                   compute_precision=ct.precision.FLOAT16).save(str(path))
    interpreter = Interpreter(path, mode="fp32")
    flat = {f"{case}_{name}": value for case, inputs in feeds.items() for name, value in inputs.items()}
    outs = interpreter.run("main", flat)
    result: dict[str, list] = {}
    for name, value in outs.items():
        case, _, i = name.rpartition("__")
        result.setdefault(case, []).append((int(i), value))
    ops = {op.type for op in interpreter.package.functions["main"].ops}
    return {case: [v for _, v in sorted(vals)] for case, vals in result.items()}, ops


# ---------------------------------------------------------------------------------------------- linears
SCHEMES = [("any4", 32), ("any4", 0), ("int4", 32), ("nf4", 32), ("int8", 0)]
PACKED_ORDER = {"any4": ("qweight", "lut", "scales", "zeros"), "int4": ("qweight", "scales", "zeros"),
                "nf4": ("qweight", "scales"), "int8": ("qweight", "scales")}


def test_quantized_linears_are_the_checkpoints_weights(tmp_path):
    """y = x W^T with W exactly the checkpoint's dequantized weight (up to fp16 rounding of tables: per-row any4, nf4),
    stored compressed: constexpr_lut_to_dense (any4, nf4) / constexpr_blockwise_shift_scale (int4, int8), at the
    checkpoint's own bits per weight (nf4: one shared table; any4 per row: scale and zero folded into its table)."""
    from pocketllm.export.nn.quant_linear import NF4_TABLE as NF4
    from pocketllm.export.nn.quant_linear import dequantize_packed
    from pocketllm.export.ops.any4_linear import any4_dequantize
    from pocketllm.export.quant.format import TensorQuant
    from pocketllm.export.quant.quantize import quantize_tensor
    from pocketllm.export.targets.coreml.converters import quantized_linear_mil, quantized_weight_arrays, weight_bits

    torch.manual_seed(0)
    N, K = 48, 128
    x = np.random.default_rng(0).standard_normal((1, 5, K)).astype(np.float32)
    cases, feeds, want = {}, {}, {}
    for scheme, group in SCHEMES:
        tq = TensorQuant(scheme, group)
        packed = quantize_tensor(torch.randn(N, K) * 0.05, tq)
        w = dequantize_packed(tq, packed, K).numpy()
        tensors = [packed[n].numpy() for n in PACKED_ORDER[scheme]]
        g = tq.group(K)
        name = f"{scheme}{group}"
        cases[name] = ((lambda x, s=scheme, g=g, t=tensors, n=name: quantized_linear_mil(x, s, g, t, n)),
                       {"x": ((1, 5, K), "fp32")})
        feeds[name] = {"x": x}
        if (scheme, group) == ("any4", 0):  # the folded per-row table is stored in fp16
            w = w.astype(np.float16).astype(np.float32)
        if scheme == "nf4":  # the shared NF4 table is stored in fp16
            nf4 = torch.tensor(np.float16(NF4).astype(np.float32))
            w = any4_dequantize(packed["qweight"], nf4.expand(N, 16), packed["scales"],
                                torch.zeros_like(packed["scales"]), g).numpy()
        want[name] = x @ w.T
        arrays = quantized_weight_arrays(scheme, g, tensors)
        expected = {"nf4": 4 + 16 / g + 256 / (N * K), "any4": 4 + 256 / K if group == 0 else None}.get(scheme)
        assert weight_bits(arrays) / (N * K) == pytest.approx(expected or tq.bits_per_weight(N, K)), name
    got, ops = run_saved(tmp_path, cases, feeds)
    for name in cases:
        np.testing.assert_allclose(got[name][0], want[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"} <= ops


# ---------------------------------------------------------------------------------------------- InfLLM v2
def brute_force_selection(q, k, start, p, rule):
    """Selected blocks [Hkv, T, NB] by a per-query loop (docs/infllm_v2.md; rule "upstream" normalises with the
    log-sum-exp over coarse kernels of size 4k / stride 4s; before any coarse kernel exists every visible kernel
    ties)."""
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
                if rule == "upstream" and not vis2:
                    score[vis1] += 1.0  # all alike
                    continue
                if rule == "upstream":
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
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = np.zeros_like(q)
    for t in range(T):
        for hq in range(Hq):
            h = hq // G
            keys = [j for j in range(start + t + 1) if sel[h, t, j // bs]]
            s = np.array([q[t, hq] @ k[j, h] for j in keys]) / math.sqrt(D)
            w = np.exp(s - s.max())
            out[t, hq] = (w / w.sum()) @ v[keys, h]
    return out


SPARSE = dict(kernel_size=32, kernel_stride=16, block_size=32, init_blocks=1, window_size=32, topk=4, dense_len=-1)
# (T, start, n_valid, dense_len): prefill chunks with and without padding, decode, the dense fallback decided by the
# real length start + n_valid (220 + 10 < 240: dense; 220 + 20 >= 240: sparse)
INFLLM_CASES = [(24, 200, 24, -1), (24, 230, 17, -1), (1, 250, 1, -1), (1, 270, 1, -1), (24, 220, 10, 240),
                (24, 220, 20, 240)]


@pytest.mark.parametrize("rule", ["exact", "upstream"])
def test_infllm_composite(tmp_path, rule):
    """The composite over a static cache (padding after n_valid rows, compressed keys from a state that holds the
    earlier kernels) selects exactly the brute-force blocks and attends like them; it also equals the shared
    reference op (export/ops/infllm_attention.py) for the real rows."""
    from pocketllm.export.ops.infllm_attention import SCORE_RULE_CODES, infllm_attention_reference
    from pocketllm.export.targets.coreml.converters import infllm_attention_mil, update_compressed_keys_mil
    from pocketllm.export.targets.coreml.swaps import kernel_count

    S, Hq, Hkv, D = 288, 4, 2, 16
    NK = kernel_count(S, 32, 16)
    cases, feeds, data = {}, {}, {}
    for c, (T, start, n_valid, dense_len) in enumerate(INFLLM_CASES):
        p = dict(SPARSE, dense_len=dense_len)
        rng = np.random.default_rng(T + start + c)
        k = rng.standard_normal((1, S, Hkv, D)).astype(np.float32)
        v = rng.standard_normal((1, S, Hkv, D)).astype(np.float32)
        q = rng.standard_normal((1, T, Hq, D)).astype(np.float32) * np.array([4, 0.5, 4, 0.5], np.float32)[:, None]
        kc = np.zeros((1, NK, Hkv, D), np.float32)
        for j in range(NK):  # the state holds every kernel complete before this call; later rows are stale
            kc[0, j] = k[0, 16 * j:16 * j + 32].mean(0) if 16 * j + 31 < start else 7.0

        def fn(q, kk, vv, kc, s, n, T=T, p=p):
            s0, n0 = mb.squeeze(x=s), mb.squeeze(x=n)
            kc_new = update_compressed_keys_mil(kk, kc, s0, T, 32, 16)
            return infllm_attention_mil(q, kk, vv, kc_new, s0, n0, p, rule, f"out{T}_{s0.name}"), kc_new

        name = f"c{c}"
        cases[name] = (fn, {"q": (q.shape, "fp32"), "k": (k.shape, "fp32"), "v": (v.shape, "fp32"),
                            "kc": (kc.shape, "fp32"), "s": ((1,), "int32"), "n": ((1,), "int32")})
        feeds[name] = {"q": q, "k": k, "v": v, "kc": kc, "s": np.int32([start]), "n": np.int32([n_valid])}
        data[name] = (q, k, v, p, T, start, n_valid, dense_len)
    got, ops = run_saved(tmp_path, cases, feeds)
    assert {"topk", "gather", "reduce_max"} <= ops
    for name, (q, k, v, p, T, start, n_valid, dense_len) in data.items():
        out, kc_new = got[name]
        L = start + n_valid
        for j in range(NK):
            if 16 * j + 31 < L:  # every kernel complete after the call is in the state
                np.testing.assert_allclose(kc_new[0, j], k[0, 16 * j:16 * j + 32].mean(0), atol=1e-5)
        sel = brute_force_selection(q[0, :n_valid], k[0, :L], start, p, rule)
        if dense_len != -1 and L < dense_len:
            sel[:] = True
        else:
            assert not sel.all(), f"{name} must drop blocks"
        want = attention_with_selection(q[0, :n_valid], k[0], v[0], start, sel, p["block_size"])
        np.testing.assert_allclose(out[0, :n_valid], want, atol=2e-5, err_msg=name)
        ref = infllm_attention_reference(torch.from_numpy(q[:, :n_valid]), torch.from_numpy(k), torch.from_numpy(v),
                                         start, 32, 16, 32, 1, 32, 4, dense_len, SCORE_RULE_CODES[rule])
        np.testing.assert_allclose(out[0, :n_valid], ref[0].numpy(), atol=2e-5, err_msg=name)


def test_infllm_rules_differ():
    """The two scoring rules select differently once the heads of a group disagree in scale (the per-head
    normaliser then reweights them), so the composite test above tells them apart."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((280, 2, 16)).astype(np.float32)
    q = rng.standard_normal((24, 4, 16)).astype(np.float32) * np.array([4, 0.5, 4, 0.5], np.float32)[None, :, None]
    assert (brute_force_selection(q, k, 256, SPARSE, "exact") != brute_force_selection(q, k, 256, SPARSE,
                                                                                         "upstream")).any()


# ---------------------------------------------------------------------------------------------- lightning
def test_lightning_block_form(tmp_path):
    """The block form in MIL (decays computed at run time from the per-head rates) equals the shared reference op
    over several blocks, from a non-zero state; rows after n_valid leave the state alone."""
    from pocketllm.export.ops.lightning_attention import lightning_attention_reference, lightning_decay_rates
    from pocketllm.export.targets.coreml.converters import lightning_attention_mil

    B, T, H, D = 1, 20, 4, 8
    rng = np.random.default_rng(1)
    q, k, v = (np.abs(rng.standard_normal((B, T, H, D))).astype(np.float32) for _ in range(3))
    state = rng.standard_normal((B, H, D, D)).astype(np.float32)
    decay = lightning_decay_rates(H, 1, 4).numpy()
    cases, feeds = {}, {}
    for n in (T, 13):
        cases[f"n{n}"] = ((lambda q, k, v, s, nv, n=n: lightning_attention_mil(q, k, v, s, decay, 8, mb.squeeze(x=nv),
                                                                              f"out{n}")),
                          {"q": (q.shape, "fp32"), "k": (k.shape, "fp32"), "v": (v.shape, "fp32"),
                           "s": (state.shape, "fp32"), "n": ((1,), "int32")})
        feeds[f"n{n}"] = {"q": q, "k": k, "v": v, "s": state, "n": np.int32([n])}
    got, _ = run_saved(tmp_path, cases, feeds)
    for n in (T, 13):
        out, new_state = got[f"n{n}"]
        ref_out, ref_state = lightning_attention_reference(*(torch.from_numpy(a[:, :n]) for a in (q, k, v)),
                                                           torch.from_numpy(state), torch.from_numpy(decay), 8)
        # the per-head rates are fp16 constants in the package (relative rounding 2^-11)
        np.testing.assert_allclose(out[:, :n], ref_out.numpy(), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(new_state, ref_state.numpy(), rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------- swapped model
MAX_CONTEXT, CHUNK = 320, 32


def twin_configs() -> dict[str, tuple[dict, str]]:
    """name -> (config, quant scheme): every swap (dense core, InfLLM v2 core crossing from the dense fallback into
    sparse selection, sliding window, NoPE, routed MoE dispatch, int4 / int8 / any4 linears, lightning)."""
    from pocketllm.export.families import preset_config

    mc = preset_config("minicpm4", "tiny")
    sparse = dict(mc, num_hidden_layers=1, sparse_config=dict(mc["sparse_config"], window_size=64, topk=3,
                                                             dense_len=160))
    st = dict(preset_config("smallthinker", "tiny"), num_hidden_layers=2, rope_layout=[0, 1],
              sliding_window_layout=[0, 1])
    mm = dict(preset_config("minimax", "tiny"), num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    return {"minicpm4_infllm_any4": (sparse, "any4"), "smallthinker_int4": (st, "int4"), "minimax_int8": (mm, "int8")}


class PackageLike:
    """The swapped model driven as CoreMLEngine drives a package: prefill chunks of CHUNK tokens (a short tail padded
    with id -1, or token by token when the model has a recurrent state), single tokens through a [1, 1] call."""

    def __init__(self, model, recurrent: bool):
        self.model, self.recurrent = model, recurrent

    def call(self, tokens, start):
        T = 1 if len(tokens) == 1 else CHUNK
        ids = torch.full((1, T), -1, dtype=torch.int32)
        ids[0, :len(tokens)] = torch.as_tensor(np.asarray(tokens), dtype=torch.int32)
        with torch.no_grad():
            return self.model(ids, torch.tensor([start], dtype=torch.int32))[0, :len(tokens)].numpy()

    def forward(self, tokens, start):
        outs, s = [], 0
        while s < len(tokens):
            rest = len(tokens) - s
            n = min(rest, CHUNK) if rest > 1 and not (self.recurrent and rest < CHUNK) else 1
            outs.append(self.call(tokens[s:s + n], start + s))
            s += n
        return np.concatenate(outs)


def drive(engine, rng, vocab: int, recurrent: bool):
    """A session: a 300-token prompt, 12 decode steps, a rewind into InfLLM v2's sparse range (not with a recurrent
    state), a new sequence. Returns the logits of every call."""
    a, b = rng.integers(3, vocab, 320), rng.integers(3, vocab, 80)
    rewind = [] if recurrent else [(b[:45], 230), (b[45:46], 275)]
    session = [(a[:300], 0)] + [(a[300 + i:301 + i], 300 + i) for i in range(12)] + rewind + [(b[:70], 0),
                                                                                              (b[70:71], 70)]
    return [engine.forward(tokens, start) for tokens, start in session]


@pytest.mark.parametrize("name", list(twin_configs()))
def test_swapped_model_is_its_eager_twin(tmp_path, name):
    """Before any export: the model with the Core ML swaps computes the eager model's logits for the real tokens,
    through padded chunks, decode steps, a rewind and a new sequence."""
    from pocketllm.export.nn.load import load_model
    from pocketllm.export.quant.quantize import quantize_checkpoint
    from pocketllm.export.targets.coreml.swaps import CoreMLDispatch, CoreMLInfLLMCore, CoreMLQuantLinear, apply_swaps
    from tests.test_executorch_export import make_checkpoint

    cfg, scheme = twin_configs()[name]
    ckpt = make_checkpoint(tmp_path / "fp", cfg, seed=3)
    quantize_checkpoint(ckpt, tmp_path / "q", scheme, group_size=None if scheme == "int8" else 16)
    eager, _ = load_model(tmp_path / "q", max_context=MAX_CONTEXT, dtype="fp32")
    swapped, _ = load_model(tmp_path / "q", max_context=MAX_CONTEXT, dtype="fp32")
    counts = apply_swaps(swapped)
    kinds = {type(m) for m in swapped.modules()}
    assert (CoreMLInfLLMCore in kinds) == (name.startswith("minicpm4")) and counts["infllm"] == int(
        name.startswith("minicpm4"))
    assert (CoreMLDispatch in kinds) == (eager.spec.moe is not None)
    assert (CoreMLQuantLinear in kinds) == (scheme != "any4")
    recurrent = counts["lightning"] > 0

    class Eager:
        def forward(self, tokens, start):
            with torch.no_grad():
                return eager(torch.as_tensor(np.asarray(tokens)).long()[None], start)[0].numpy()

    got = drive(PackageLike(swapped, recurrent), np.random.default_rng(4), eager.spec.vocab_size, recurrent)
    want = drive(Eager(), np.random.default_rng(4), eager.spec.vocab_size, recurrent)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
