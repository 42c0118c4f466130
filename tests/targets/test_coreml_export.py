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
    # stored bits: the checkpoint's own (docs/quantization.md), except nf4's one shared 16-entry table, and any4
    # with one group per row, whose scale and zero fold into its per-row table (4 + 256/K)
    arrays = quantized_weight_arrays(scheme, g, tensors)
    expected = {"nf4": 4 + 16 / g + 256 / (N * K), "any4": 4 + 256 / K if group == 0 else None}.get(scheme)
    expected = expected or tq.bits_per_weight(N, K)
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


# ---------------------------------------------------------------------------------------------- whole exports
def make_checkpoint(out: Path, config: dict, seed: int, hot_tokens: int = 0) -> Path:
    """A random fp32 checkpoint whose every value is an fp16 number (what the fp16 package can hold exactly), so
    the reference and the package run the same weights. hot_tokens: the last ids get embedding rows ~300x larger
    (activations whose squares overflow fp16)."""
    from export.init_checkpoint import SPECIALS, atomic_directory, build_tokenizer, random_tensors, write_tokenizer, \
        write_weights
    from export.init_checkpoint import BUILTIN_TEXT
    from export.spec import spec_from_config

    config = dict(config, torch_dtype="float32")
    spec = spec_from_config(config)
    tensors, total = random_tensors(config, torch.float32, seed)

    def fp16_valued():
        for name, t in tensors:
            if hot_tokens and name == "model.embed_tokens.weight":
                t = t.clone()
                t[-hot_tokens:] *= HOT_SCALE
            yield name, t.to(torch.float16).to(torch.float32)

    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp, spec.family, build_tokenizer(spec.vocab_size, SPECIALS[spec.family][0],
                                                          [BUILTIN_TEXT] * 4))
        write_weights(tmp, fp16_valued(), total_bytes=total)
    return out


HOT, HOT_SCALE = 4, 300  # hot embedding rows of the dense MiniCPM4 checkpoint, and their scale


def configs() -> dict[str, tuple[dict, str, int]]:
    """name -> (config, quant scheme, group size)."""
    mc = preset_config("minicpm4", "tiny")
    dense = dict(mc, num_hidden_layers=1)
    dense.pop("sparse_config")
    # InfLLM v2: blocks of 64, 1 init + 1 local + 1 chosen of the rest (topk 3); dense below 160 tokens, so one
    # prompt crosses from the dense fallback into sparse selection that drops blocks.
    sparse = dict(mc, num_hidden_layers=1, sparse_config=dict(mc["sparse_config"], window_size=64, topk=3,
                                                             dense_len=160))
    st = preset_config("smallthinker", "tiny")
    st = dict(st, num_hidden_layers=2, rope_layout=[0, 1], sliding_window_layout=[0, 1])  # NoPE global, SWA+RoPE
    mm = preset_config("minimax", "tiny")
    mm = dict(mm, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    return {"minicpm4_dense": (dense, "none", 0), "minicpm4_infllm_any4": (sparse, "any4", 32),
            "smallthinker_int4": (st, "int4", 16), "minimax_int8": (mm, "int8", 0)}


class Case:
    def __init__(self, ckpt: Path, out: Path, entry: dict):
        from export.checkpoint import open_checkpoint

        self.ckpt, self.out, self.entry = ckpt, out, entry
        self.package = out / "model.mlpackage"
        self.spec = open_checkpoint(ckpt).spec

    def reference(self):
        from runtime_py import ReferenceModel

        return ReferenceModel.from_checkpoint(self.ckpt, max_context=MAX_CONTEXT)

    def runner(self, mode="fp32") -> CoreMLProgramRunner:
        return CoreMLProgramRunner(self.package, self.entry, mode)


def make_case_checkpoint(root: Path, name: str, cfg: dict, scheme: str, group: int, seed: int) -> Path:
    from export.quant.quantize import quantize_checkpoint

    ckpt = make_checkpoint(root / f"{name}-fp", cfg, seed, hot_tokens=HOT if name == "minicpm4_dense" else 0)
    if scheme == "none":
        return ckpt
    quantize_checkpoint(ckpt, root / f"{name}-{scheme}", scheme, group_size=group)
    return root / f"{name}-{scheme}"


def export_case(root: Path, name: str, ckpt: Path) -> Case:
    from export.nn.load import load_model
    from export.targets.coreml import CoreMLOptions, export

    model, opened = load_model(ckpt, max_context=MAX_CONTEXT, dtype="fp32")
    out = root / f"{name}-coreml"
    out.mkdir()
    scheme = configs()[name][1]
    entry = export(model, opened.spec, CoreMLOptions(max_context=MAX_CONTEXT, quant=scheme, prefill_chunk=CHUNK), out)
    (out / "entry.json").write_text(json.dumps(entry, indent=1))
    return Case(ckpt, out, entry)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml-ckpt")
    return {name: make_case_checkpoint(root, name, cfg, scheme, group, seed=20 + i)
            for i, (name, (cfg, scheme, group)) in enumerate(configs().items())}


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("coreml")
    return {name: export_case(root, name, ckpt) for name, ckpt in checkpoints.items()}


NAMES = list(configs())


@pytest.mark.parametrize("name", NAMES)
def test_swapped_model_is_its_eager_twin(checkpoints, name):
    """Before any export: the model with the Core ML swaps applied (padded fixed-size chunks with token -1, static
    caches with masks, compressed-key state, padding-aware lightning, routed MoE decode, marker linears) computes
    the eager model's logits for the real tokens, through chunks, decode steps and (but lightning) a rewind."""
    from export.nn.load import load_model
    from export.targets.coreml.swaps import apply_swaps

    eager, _ = load_model(checkpoints[name], max_context=MAX_CONTEXT, dtype="fp32")
    swapped, _ = load_model(checkpoints[name], max_context=MAX_CONTEXT, dtype="fp32")
    apply_swaps(swapped)

    class Padded:  # the swapped model driven like the package: fixed CHUNK-token prefill calls, 1-token decode
        spec = eager.spec

        def forward(self, tokens, start):
            n = len(tokens)
            T = 1 if n == 1 else CHUNK
            ids = torch.full((1, T), -1, dtype=torch.int32)
            ids[0, :n] = torch.as_tensor(np.asarray(tokens), dtype=torch.int32)
            with torch.no_grad():
                return swapped(ids, torch.tensor([start], dtype=torch.int32))[0, :n].numpy()

    class Eager:
        spec = eager.spec

        def forward(self, tokens, start):
            with torch.no_grad():
                return eager(torch.as_tensor(np.asarray(tokens)).long()[None], start)[0].numpy()

    got = drive(Padded(), np.random.default_rng(4), eager.spec)
    want = drive(Eager(), np.random.default_rng(4), eager.spec)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (HOT_SCALE if name == "minicpm4_dense" else 1))


@pytest.mark.parametrize("name", NAMES)
def test_manifest_entry_is_the_package_interface(cases, name):
    """Functions, inputs, outputs and states in the entry are exactly what the saved package declares (read back
    with coremltools), shaped as the manifest v2 contract says; both functions declare the same states."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    case = cases[name]
    entry, V = case.entry, case.spec.vocab_size
    spec = ct.utils.load_spec(str(case.package))
    assert spec.specificationVersion >= 9  # iOS 18
    assert spec.description.defaultFunctionName == entry["default_function"] == "decode"
    dtypes = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16",
              ft.ArrayFeatureType.INT32: "int32"}

    def described(features, state=False):
        out = []
        for f in features:
            t = f.type.stateType.arrayType if state else f.type.multiArrayType
            out.append({"name": f.name, "dtype": dtypes[t.dataType], "shape": list(t.shape)})
        return out

    declared = {f.name: f for f in spec.description.functions}
    assert set(declared) == set(entry["functions"]) == {"prefill", "decode"}
    for fname, T in (("prefill", CHUNK), ("decode", 1)):
        f, e = declared[fname], entry["functions"][fname]
        assert e["name"] == fname
        strip = lambda items: [{k: d[k] for k in ("name", "dtype", "shape")} for d in items]  # noqa: E731
        assert strip(e["inputs"]) == described(f.input) == [
            {"name": "tokens", "dtype": "int32", "shape": [1, T]}, {"name": "position", "dtype": "int32", "shape": [1]}]
        assert [d["role"] for d in e["inputs"]] == ["tokens", "position"]
        logits = [{"name": "logits", "dtype": "float32", "shape": [1, T, V]}]
        assert strip(e["outputs"]) == described(f.output) == logits
        assert e["outputs"][0]["role"] == "logits"
        assert entry["states"] == described(f.state, state=True)
    assert entry["deployment_target"] == "iOS18" and entry["compute_precision"] == "float16"
    assert entry["file"] == "model.mlpackage" and entry["requires_kernels"] == []
    assert entry["prefill_chunk"] == CHUNK and entry["pad_token_id"] == -1
    on_disk = {p.relative_to(case.out).as_posix(): p.stat().st_size for p in case.package.rglob("*") if p.is_file()}
    assert {k: v["size"] for k, v in entry["files"].items()} == on_disk  # relative POSIX paths, sha256 + size
    assert "model.mlpackage/Manifest.json" in on_disk


def expected_states(spec) -> dict[str, list[int]]:
    from export.targets.coreml.swaps import kernel_count

    out = {}
    Hkv, D = spec.num_kv_heads, spec.head_dim
    for i, layer in enumerate(spec.layers):
        p = f"model_layers_{i}_self_attn_"
        if layer.attention == "lightning":
            out[p + "state"] = [1, spec.num_heads, D, D]
            continue
        out[p + "cache_k_cache"] = out[p + "cache_v_cache"] = [1, MAX_CONTEXT, Hkv, D]
        if layer.attention == "infllm":
            s = spec.sparse
            out[p + "core_kc_cache"] = [1, kernel_count(MAX_CONTEXT, s.kernel_size, s.kernel_stride), Hkv, D]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_cache_is_a_state(cases, name):
    """KV caches, InfLLM v2 compressed keys and lightning states are fp16 states of both functions, each read once
    and written back through coreml_update_state; nothing else is a state."""
    from export.targets.coreml.lower import load_program

    case = cases[name]
    want = expected_states(case.spec)
    assert {s["name"]: s["shape"] for s in case.entry["states"]} == want
    assert all(s["dtype"] == "float16" for s in case.entry["states"])
    prog = load_program(case.package)
    for fname, fn in prog.functions.items():
        states = {n for n, v in fn.inputs.items() if n not in ("tokens", "position")}
        assert states == set(want), fname
        ops = list(fn.operations)
        read = sorted(op.inputs["input"].name for op in ops if op.op_type == "read_state")
        written = {op.inputs["state"].name for op in ops if op.op_type == "coreml_update_state"}
        assert read == sorted(want) and written == set(want), fname


def weight_source(var):
    op = var.op
    while op is not None and op.op_type in ("cast", "reshape", "transpose"):
        op = op.inputs["x"].op
    return op


@pytest.mark.parametrize("name", [n for n in NAMES if configs()[n][1] != "none"])
def test_every_quantized_linear_reads_a_constexpr(cases, name):
    """Each quantized module of the checkpoint is one constexpr op per function (any4: uint4 LUT with per-row
    tables; int4/int8: blockwise shift-scale of int4/int8 data), and every other weight a linear reads is an fp16
    const only for the embedding/LM head or an MoE router. Stored bits per weight match the checkpoint's."""
    from export.checkpoint import open_checkpoint
    from export.targets.coreml.lower import load_program
    from coremltools.converters.mil.mil import types

    case = cases[name]
    quant = open_checkpoint(case.ckpt).quantization
    scheme = configs()[name][1]
    spec = case.spec
    float_shapes = {(spec.vocab_size, spec.hidden_size)}
    if spec.moe is not None:
        float_shapes.add((spec.moe.num_experts, spec.hidden_size))
    prog = load_program(case.package)
    for fname, fn in prog.functions.items():
        constexpr = [op for op in fn.operations if op.op_type.startswith("constexpr_")]
        assert len(constexpr) == len(quant.modules), fname
        for op in constexpr:
            if scheme == "any4":
                assert op.op_type == "constexpr_lut_to_dense"
                assert types.builtin_to_string(op.indices.dtype) == "uint4"
                G, N, g = op.indices.shape
                assert tuple(op.lut.shape) == (1, N, 1, 16, 1)  # one 16-entry table per output row
            else:
                assert op.op_type == "constexpr_blockwise_shift_scale"
                assert types.builtin_to_string(op.data.dtype) == ("int4" if scheme == "int4" else "int8")

        def all_ops(block):
            for op in block.operations:
                yield op
                for b in op.blocks:
                    yield from all_ops(b)

        for op in all_ops(fn):
            if op.op_type == "linear":
                src = weight_source(op.inputs["weight"])
                if not src.op_type.startswith("constexpr_"):
                    assert tuple(src.outputs[0].shape) in float_shapes, (fname, op.name, src.outputs[0].shape)
            if op.op_type == "matmul":
                src = weight_source(op.inputs["y"])
                if src is not None and src.op_type == "const":
                    assert src.outputs[0].rank <= 2 and min(src.outputs[0].shape) <= 8, \
                        f"{op.name} multiplies by a dense constant {src.outputs[0].shape}"  # zeros/scales only
    bits = case.entry["quantization"]["stored_bits_per_weight"]
    assert bits == pytest.approx(quant.bits_per_weight(), abs=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_only_ios18_ops(cases, name):
    """Every op the saved package holds (its protobuf program, nested blocks included) is a core MIL op available at
    iOS 18 (`write_state` is the iOS 18 state write that coremltools models as coreml_update_state); both
    functions are CoreML8 (iOS 18) programs."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    spec = ct.utils.load_spec(str(cases[name].package))

    def op_types(block):
        for op in block.operations:
            yield op.type
            for b in op.blocks:
                yield from op_types(b)

    seen = set()
    for fname, f in spec.mlProgram.functions.items():
        assert f.opset == "CoreML8", fname
        seen |= set(op_types(f.block_specializations[f.opset]))
    for t in seen - {"write_state"}:
        assert t in SSAOpRegistry.core_ops and t not in SSAOpRegistry.dialect_ops, t
        assert min(SSAOpRegistry.core_ops[t]) <= ct.target.iOS18, t
    assert {"read_state", "write_state", "slice_update"} <= seen
    if cases[name].spec.moe is not None:
        assert "cond" in seen  # routed experts


def drive(engine, rng, spec, dropped=None):
    """An app session, chunked the way the package is called (prefill chunks of CHUNK tokens, the last one padded;
    single tokens through decode): a 300-token prompt, 12 decode steps, a rewind to 230 (not for lightning
    models: a running state cannot rewind), a new sequence. Returns the logits of every call in order. dropped: list
    collecting, for the reference, whether the InfLLM v2 selection of a call left out a valid block."""
    a = rng.integers(3, spec.vocab_size - HOT, 320)
    b = rng.integers(3, spec.vocab_size - HOT, 80)
    # rewind to 230 (InfLLM v2: the compressed keys of the rewritten rows must be recomputed; sparse from 160 on)
    rewind = [(b[:45], 230), (b[45:46], 275)] if spec.lightning is None else []
    session = [(a[:300], 0)] + [(a[300 + i:301 + i], 300 + i) for i in range(12)] + rewind + [
        (b[:70], 0), (b[70:71], 70)]
    out = []
    for tokens, start in session:
        for s in range(0, len(tokens), CHUNK):
            out.append(engine.forward(tokens[s:s + CHUNK], start + s))
            sel = getattr(engine, "last_selection", [None])[0]  # [Hkv, T, n_blocks], reference only
            if dropped is not None and sel is not None:
                T, B = sel.shape[1], engine.spec.sparse.block_size
                valid = (start + s + np.arange(T)) // B + 1  # blocks 0 .. b_q of each query
                dropped.append(bool((sel.sum(axis=-1) < valid[None]).any()))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_program_matches_reference(cases, name):
    """The saved program, run in fp32 on its stored (fp16) weights, gives the numpy reference's logits through
    chunked prefill with padding, decode, rewinds and a new sequence (InfLLM v2 dense and sparse, sliding window,
    NoPE, MoE, lightning)."""
    case = cases[name]
    ref, eng = case.reference(), case.runner("fp32")
    dropped = []
    got = drive(eng, np.random.default_rng(1), case.spec)
    want = drive(ref, np.random.default_rng(1), case.spec, dropped)
    # the HOT ids of the dense MiniCPM4 checkpoint have 300x embeddings, hence 300x logits (tied head): 300x tolerance
    worst = max(float(np.abs(g - w)[:, :-HOT].max()) for g, w in zip(got, want))
    worst_hot = max(float(np.abs(g - w)[:, -HOT:].max()) for g, w in zip(got, want)) / HOT_SCALE
    assert worst <= 5e-3 and worst_hot <= 5e-3, (worst, worst_hot)
    if case.spec.sparse is not None:
        assert any(dropped), "no call made InfLLM v2 drop a block"


@pytest.mark.parametrize("name", NAMES)
def test_fp16_program_agrees_on_top1(cases, name):
    """fp16 emulation (every op rounded to fp16, like the device): the same greedy token at >= 95% of steps."""
    case = cases[name]
    got = np.concatenate(drive(case.runner("fp16"), np.random.default_rng(2), case.spec))
    want = np.concatenate(drive(case.reference(), np.random.default_rng(2), case.spec))
    assert np.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_fp16_norms_survive_activations_that_overflow_naive_fp16(cases):
    """A prompt of the HOT ids (embeddings x scale_emb reach |x| > 256, so a naive fp16 RMSNorm's x^2 is inf): the
    fp16 program's norms divide by max|x| first (RescaledRMSNorm), so every logit stays finite and the greedy tokens
    are the reference's. The test reads the largest |x| any norm received, proving the prompt is past the limit."""
    case = cases["minicpm4_dense"]
    V = case.spec.vocab_size
    prompt = np.array([3, V - 1, 7, V - 2, V - 3, 9, V - 4, 11] * 4)
    runner, ref = case.runner("fp16"), case.reference()
    got, want = runner.forward(prompt, 0), ref.forward(prompt, 0)
    norm_input = runner.eval.max_abs_input["abs"]  # |x| entering RescaledRMSNorm (its first op is abs)
    assert norm_input > 256, norm_input  # (naive fp16: x^2 > 65504 = inf)
    assert np.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.25)


def test_bad_options_are_one_line_errors():
    from export.targets.coreml import CoreMLOptions

    bad = [dict(deployment_target="iOS17"), dict(deployment_target="iOS99"), dict(quant="8da4w"),
           dict(quant="fp8"), dict(prefill_chunk=400), dict(prefill_chunk=1), dict(compute_precision="int8"),
           dict(infllm_score_rule="approximate")]
    for kwargs in bad:
        with pytest.raises(PocketllmError) as e:
            CoreMLOptions(max_context=320, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(PocketllmError, match="iOS18"):
        CoreMLOptions(max_context=320, deployment_target="iOS17")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from export.init_checkpoint import init_checkpoint

    return init_checkpoint("smallthinker", "tiny", tmp_path_factory.mktemp("st") / "ckpt", seed=3, dtype="fp32")


def test_weight_file_over_limit_is_refused_before_writing(tiny_model_dir, tmp_path):
    from export.nn.load import load_model
    from export.targets.coreml import CoreMLOptions, export

    model, ckpt = load_model(tiny_model_dir, max_context=64, dtype="fp32")
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(PocketllmError, match="GiB") as e:
        export(model, ckpt.spec, CoreMLOptions(max_context=64, prefill_chunk=16, max_weight_file_bytes=100_000), out)
    assert "\n" not in str(e.value)
    assert list(out.iterdir()) == []


def test_quantized_lm_head_is_refused(tiny_model_dir, tmp_path):
    from export.nn.load import load_model
    from export.quant.quantize import quantize_checkpoint
    from export.targets.coreml import CoreMLOptions, export

    qdir = tmp_path / "q"
    quantize_checkpoint(tiny_model_dir, qdir, "int8", quantize_lm_head=True)
    model, ckpt = load_model(qdir, max_context=64, dtype="fp32")
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(PocketllmError, match="LM head") as e:
        export(model, ckpt.spec, CoreMLOptions(max_context=64, prefill_chunk=16, quant="int8"), out)
    assert "\n" not in str(e.value)
    assert list(out.iterdir()) == []


def test_weights_are_shared_between_functions(cases):
    """save_multifunction stores one copy of every weight for both functions: the weight file is the size of the
    model's weights once (estimate: fp16 floats + packed quantized tensors), not twice."""
    for case in cases.values():
        entry = case.entry
        assert entry["weights_bytes"] < 1.3 * entry["weights_estimate_bytes"], case.out.name
