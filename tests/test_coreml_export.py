"""Core ML target end to end: `pocketllm export --target coreml` -> bundle with model.mlpackage -> the MIL interpreter
(runtime_py/runners/coreml) -> `pocketllm parity` in both modes, and what the saved package holds.

Bundles (module fixture, exported once through the CLI; Core ML conversion costs ~20-40 s each on two busy cores):
- minicpm4_dense: fp16 weights, `--target executorch,coreml` (two artifacts, one manifest);
- minicpm4_infllm_any4: any4 g16 + InfLLM v2 (dense below 160 tokens, then sparse selection that drops blocks);
- smallthinker: fp16 weights, MoE (routed experts through `cond` in decode), NoPE global + sliding-window layers;
- minimax: fp16 weights, lightning + softmax layers, MoE.
Checkpoints are the tiny presets cut to 1-2 layers. Random weights give near-flat logits whose top-2 gaps fall below
fp16 resolution, where no fp16 runtime can keep greedy decisions; trained models have margins. So the untied
families' LM head is written equal to the embedding (minicpm4's tiny preset ties them anyway): the input token
then leads its logits by a margin like a trained model's, which is what the fp16-mode criterion needs. The numpy
reference runs the bundle's own weights rounded to fp16, as the package stores them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.main import app

ct = pytest.importorskip("coremltools")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_CONTEXT = 320
runner = CliRunner()


def configs() -> dict[str, tuple[dict, list[str]]]:
    """name -> (config, extra export arguments)."""
    from pocketllm.export.families import preset_config

    mc = preset_config("minicpm4", "tiny")
    dense = dict(mc, num_hidden_layers=1)
    dense.pop("sparse_config")
    sparse = dict(mc, num_hidden_layers=1, sparse_config=dict(mc["sparse_config"], window_size=64, topk=1,
                                                             dense_len=160))
    st = dict(preset_config("smallthinker", "tiny"), num_hidden_layers=2, rope_layout=[0, 1],
              sliding_window_layout=[0, 1])  # NoPE global, SWA + RoPE
    mm = dict(preset_config("minimax", "tiny"), num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    return {"minicpm4_dense": (dense, ["--target", "executorch,coreml"]),
            "minicpm4_infllm_any4": (sparse, ["--target", "coreml", "--quant", "any4", "--group-size", "16"]),
            "smallthinker": (st, ["--target", "coreml"]),
            "minimax": (mm, ["--target", "coreml"])}


NAMES = list(configs())


def make_checkpoint(out: Path, config: dict, seed: int) -> Path:
    """tests/test_executorch_export.py's random checkpoint, with an untied LM head equal to the embedding."""
    from safetensors.numpy import load_file, save_file

    from tests.test_executorch_export import make_checkpoint as write

    write(out, config, seed)
    if not config.get("tie_word_embeddings"):
        index = out / "model.safetensors.index.json"
        where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
        embed = load_file(out / where.get("model.embed_tokens.weight", "model.safetensors"))
        head_file = out / where.get("lm_head.weight", "model.safetensors")
        tensors = load_file(head_file)
        tensors["lm_head.weight"] = embed["model.embed_tokens.weight"].copy()
        save_file(tensors, head_file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml-ckpt")
    return {name: make_checkpoint(root / name, cfg, seed=20 + i) for i, (name, (cfg, _)) in
            enumerate(configs().items())}


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """name -> bundle, each exported once through the CLI."""
    from tests.kernels import build_kernels

    build_kernels()  # the combined bundle's ExecuTorch runner
    root = tmp_path_factory.mktemp("coreml")
    out = {}
    for name, (_, extra) in configs().items():
        bundle = root / name
        r = runner.invoke(app, ["export", "--checkpoint", str(checkpoints[name]), "--max-context", str(MAX_CONTEXT),
                                "--prefill-chunk", "32", "--out", str(bundle), *extra])
        assert r.exit_code == 0, r.output
        out[name] = bundle
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", NAMES)
def test_parity_both_modes(bundles, name):
    """`pocketllm parity BUNDLE` passes for the Core ML artifact: fp32 mode within 5e-3 of the reference (on the
    weights rounded to fp16), fp16 mode with identical greedy continuations over the built-in prompts (64 steps) and
    top-1 agreement >= 0.99; both modes are recorded in parity.json and in the manifest."""
    bundle = bundles[name]
    r = runner.invoke(app, ["parity", str(bundle), "--target", "coreml"])
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())["coreml"]
    assert report["passed"] and report["reference_weights"] == "float16"
    fp32, fp16 = report["modes"]["fp32"], report["modes"]["fp16"]
    assert fp32["passed"] and fp32["max_abs_delta"] <= 5e-3 and fp32["criteria"] == {"tolerance": 5e-3}
    assert fp16["passed"] and fp16["continuations_identical"] and fp16["top1_agreement"] >= 0.99
    assert all(len(p["artifact_continuation"]) == 64 for p in fp16["prompts"]) and len(fp16["prompts"]) == 5
    assert fp16["max_abs_delta"] > fp32["max_abs_delta"]  # fp16 rounding shows in fp16 mode only
    if name == "minicpm4_infllm_any4":
        assert report["infllm_engaged"]  # some call dropped a block
        assert report["quant"] == "any4"
    recorded = manifest_of(bundle)["parity"]["coreml"]
    assert recorded["passed"] and set(recorded["modes"]) == {"fp32", "fp16"}
    assert "fp32 PASS" in r.output.replace("mode ", "") and "fp16 PASS" in r.output.replace("mode ", "")


def test_parity_one_mode_and_bad_mode(bundles, tmp_path):
    bundle = tmp_path / "moved"  # bundles are relocatable; this copy has no parity record yet
    shutil.copytree(bundles["minimax"], bundle)
    (bundle / "parity.json").unlink(missing_ok=True)
    r = runner.invoke(app, ["parity", str(bundle), "--mode", "fp32", "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "coreml mode fp32 PASS" in r.output and "mode fp16" not in r.output
    assert set(json.loads((bundle / "parity.json").read_text())["coreml"]["modes"]) == {"fp32"}
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "8"])  # both modes, more steps: replaces the record
    assert r.exit_code == 0, r.output
    assert set(json.loads((bundle / "parity.json").read_text())["coreml"]["modes"]) == {"fp32", "fp16"}
    r = runner.invoke(app, ["parity", str(bundle), "--mode", "fp16", "--steps", "4"])  # quicker: the record stays
    assert r.exit_code == 0 and "not saved" in r.output, r.output
    assert set(json.loads((bundle / "parity.json").read_text())["coreml"]["modes"]) == {"fp32", "fp16"}
    r = runner.invoke(app, ["parity", str(bundle), "--mode", "bf16"])
    assert r.exit_code == 2 and "--mode 'bf16': the coreml runner has modes fp32, fp16" in r.output


# ---------------------------------------------------------------------------------------------- bundles
def test_executorch_and_coreml_in_one_bundle(bundles):
    """`--target executorch,coreml`: both artifacts, one manifest listing every file of both, one reference; parity
    of every target; `--engine executorch|coreml` read the same bundle and agree."""
    bundle = bundles["minicpm4_dense"]
    m = manifest_of(bundle)
    assert list(m["targets"]) == ["executorch", "coreml"]
    assert (bundle / "model.pte").is_file() and (bundle / "model.mlpackage").is_dir()
    package_files = {p.relative_to(bundle).as_posix() for p in (bundle / "model.mlpackage").rglob("*") if p.is_file()}
    assert package_files and package_files <= set(m["files"]) and "model.pte" in m["files"]
    assert m["model"]["prefill_chunk"] == 32 == m["targets"]["coreml"]["prefill_chunk"]
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "16"])  # every target of the bundle
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())
    assert report["executorch"]["passed"] and report["coreml"]["passed"]
    assert "reference_weights" not in manifest_of(bundle)["parity"]["executorch"]

    logits = {}
    for engine in ("executorch", "coreml"):
        out = bundle.parent / f"{engine}.npy"
        r = runner.invoke(app, ["logits", "--engine", engine, "--bundle", str(bundle), "--tokens", "1,57,301,8,99",
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        logits[engine] = np.load(out)
    assert logits["coreml"].shape == logits["executorch"].shape == (5, m["model"]["vocab_size"])
    assert np.abs(logits["coreml"] - logits["executorch"]).max() < 0.1  # fp16 package vs fp32 program
    assert (logits["coreml"].argmax(-1) == logits["executorch"].argmax(-1)).all()


def test_generate_with_the_coreml_engine(bundles):
    bundle = bundles["minimax"]
    r = runner.invoke(app, ["generate", "--engine", "coreml", "--bundle", str(bundle), "--prompt", "It is a truth",
                            "--greedy", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("It is a truth")


# ---------------------------------------------------------------------------------------------- the saved program
def saved_program(bundle: Path):
    from pocketllm.export.targets.coreml.lower import load_program

    return load_program(bundle / "model.mlpackage")


def all_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from all_ops(b)


def expected_states(spec) -> dict[str, list[int]]:
    from pocketllm.export.targets.coreml.swaps import kernel_count

    out = {}
    for i, layer in enumerate(spec.layers):
        p = f"model_layers_{i}_self_attn_"
        if layer.attention == "lightning":
            out[p + "state_cache_state"] = [1, spec.num_heads, spec.head_dim, spec.head_dim]
            continue
        out[p + "cache_k_cache"] = out[p + "cache_v_cache"] = [1, MAX_CONTEXT, spec.num_kv_heads, spec.head_dim]
        if layer.attention == "infllm":
            s = spec.sparse
            out[p + "core_kc_cache"] = [1, kernel_count(MAX_CONTEXT, s.kernel_size, s.kernel_stride),
                                        spec.num_kv_heads, spec.head_dim]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_cache_is_a_state(checkpoints, bundles, name):
    """KV caches, InfLLM v2 compressed keys and lightning states are fp16 states of both functions, each read and
    written back (coreml_update_state); nothing else is a state."""
    from pocketllm.export.checkpoint import open_checkpoint

    want = expected_states(open_checkpoint(checkpoints[name]).spec)
    entry = manifest_of(bundles[name])["targets"]["coreml"]
    assert {s["name"]: s["shape"] for s in entry["states"]} == want
    assert all(s["dtype"] == "float16" for s in entry["states"])
    for fname, fn in saved_program(bundles[name]).functions.items():
        assert {n for n in fn.inputs if n not in ("tokens", "position")} == set(want), fname
        ops = list(all_ops(fn))
        read = {op.inputs["input"].name for op in ops if op.op_type == "read_state"}
        written = {op.inputs["state"].name for op in ops if op.op_type == "coreml_update_state"}
        assert read == set(want) and written == set(want), fname


def weight_source(var):
    op = var.op
    while op is not None and op.op_type in ("cast", "reshape", "transpose"):
        op = op.inputs["x"].op
    return op


def test_every_quantized_linear_reads_a_constexpr(checkpoints, bundles):
    """Each quantized module of the any4 checkpoint is one constexpr_lut_to_dense op (uint4 codes, one 16-entry
    table per output row) per function; every other weight a linear or matmul reads is the fp16 embedding / LM head
    (or a small scale / zero table); the stored bits per weight are the checkpoint's."""
    from coremltools.converters.mil.mil import types

    from pocketllm.export.checkpoint import open_checkpoint

    bundle = bundles["minicpm4_infllm_any4"]
    quant = open_checkpoint(bundle / "reference").quantization
    spec = open_checkpoint(checkpoints["minicpm4_infllm_any4"]).spec
    zero_tables = {(k // 16, n) for n, k in quant.shapes.values()}
    for fname, fn in saved_program(bundle).functions.items():
        constexpr = [op for op in all_ops(fn) if op.op_type.startswith("constexpr_")]
        assert len(constexpr) == len(quant.modules), fname
        for op in constexpr:
            assert op.op_type == "constexpr_lut_to_dense"
            assert types.builtin_to_string(op.indices.dtype) == "uint4"
            G, N, g = op.indices.shape
            assert tuple(op.lut.shape) == (1, N, 1, 16, 1) and g == 16
        for op in all_ops(fn):
            if op.op_type == "linear":
                src = weight_source(op.inputs["weight"])
                assert src.op_type.startswith("constexpr_") or tuple(src.outputs[0].shape) == (
                    spec.vocab_size, spec.hidden_size), (fname, op.name)
            if op.op_type == "matmul":  # the only constants multiplied in: per-group zeros [K / 16, N]
                src = weight_source(op.inputs["y"])
                if src is not None and src.op_type == "const":
                    assert tuple(src.outputs[0].shape) in zero_tables, (fname, op.name, src.outputs[0].shape)
    stored = manifest_of(bundle)["targets"]["coreml"]["quantization"]
    assert stored["stored_bits_per_weight"] == pytest.approx(quant.bits_per_weight(), abs=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_only_ios18_ops(bundles, name):
    """Every op of the saved protobuf program (nested blocks included) is a core MIL op available at iOS 18
    (`write_state` is iOS 18's state write, which coremltools models as coreml_update_state); both functions are
    CoreML8 (iOS 18) programs."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    spec = ct.utils.load_spec(str(bundles[name] / "model.mlpackage"))

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
    if name in ("smallthinker", "minimax"):
        assert "cond" in seen  # routed experts in decode


@pytest.mark.parametrize("name", NAMES)
def test_manifest_entry_is_the_package_interface(checkpoints, bundles, name):
    """Function, input, output and state names, shapes and dtypes in targets.coreml are exactly what the saved
    package declares; the rest of the entry says how to drive it."""
    from pocketllm.export.checkpoint import open_checkpoint
    from coremltools.proto import FeatureTypes_pb2 as ft

    bundle = bundles[name]
    entry = manifest_of(bundle)["targets"]["coreml"]
    V = open_checkpoint(checkpoints[name]).spec.vocab_size
    spec = ct.utils.load_spec(str(bundle / "model.mlpackage"))
    assert spec.specificationVersion >= 9 and spec.description.defaultFunctionName == entry["default_function"]
    dtypes = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16",
              ft.ArrayFeatureType.INT32: "int32"}

    def described(features, state=False):
        return [{"name": f.name, "shape": list((f.type.stateType.arrayType if state else f.type.multiArrayType).shape),
                 "dtype": dtypes[(f.type.stateType.arrayType if state else f.type.multiArrayType).dataType]}
                for f in features]

    declared = {f.name: f for f in spec.description.functions}
    assert set(declared) == set(entry["functions"]) == {"prefill", "decode"}
    strip = lambda items: [{k: d[k] for k in ("name", "shape", "dtype")} for d in items]  # noqa: E731
    for fname, T in (("prefill", 32), ("decode", 1)):
        f, e = declared[fname], entry["functions"][fname]
        assert e["name"] == fname
        assert strip(e["inputs"]) == described(f.input) == [{"name": "tokens", "shape": [1, T], "dtype": "int32"},
                                                           {"name": "position", "shape": [1], "dtype": "int32"}]
        assert [d["role"] for d in e["inputs"]] == ["tokens", "position"]
        assert strip(e["outputs"]) == described(f.output) == [{"name": "logits", "shape": [1, T, V], "dtype": "float32"}]
        assert [d["role"] for d in e["outputs"]] == ["logits"]
        assert entry["states"] == described(f.state, state=True)
    assert entry["deployment_target"] == "iOS18" and entry["compute_precision"] == "float16"
    assert entry["float_weights"] == "float16" and entry["requires_kernels"] == [] and entry["pad_token_id"] == -1
    lightning = name == "minimax"
    assert entry["pads_prefill"] is not lightning and entry["rewinds"] is not lightning
    assert entry["weights_bytes"] < 1.3 * entry["weights_estimate_bytes"]  # one copy of the weights for both functions


# ---------------------------------------------------------------------------------------------- bad input
def one_line_error(args, out: Path, stages: bool = False) -> str:
    """The export fails with exit code 2 and one error line (after the lines of the stages that ran, if allowed)
    and writes nothing."""
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and (len(lines) == 1 or stages), r.output
    assert all(line.rstrip().endswith(" s") for line in lines[:-1]), r.output  # stage timings only
    assert not out.exists(), "nothing is written"
    return lines[-1]


@pytest.fixture(scope="module")
def quantized_head(checkpoints, tmp_path_factory) -> Path:
    from pocketllm.export.quant.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("qhead") / "int8-head"
    quantize_checkpoint(checkpoints["smallthinker"], out, "int8", quantize_lm_head=True)
    return out


def test_bad_input_is_one_line_and_writes_nothing(checkpoints, quantized_head, tmp_path):
    ckpt = str(checkpoints["smallthinker"])
    out = tmp_path / "bundle"
    base = ["export", "--checkpoint", ckpt, "--target", "coreml", "--out", str(out), "--max-context", "64"]
    msg = one_line_error(base + ["--target-option", "coreml.deployment_target=iOS17"], out)
    assert "iOS17" in msg and "states" in msg and "iOS18" in msg
    msg = one_line_error(base + ["--quant", "8da4w"], out)
    assert "8da4w" in msg and "executorch" in msg
    msg = one_line_error(base + ["--target-option", "coreml.max_weight_file_bytes=100000"], out)
    assert "MiB" in msg and "weight file" in msg and "0.10 MiB" in msg
    msg = one_line_error(["export", "--checkpoint", str(quantized_head), "--target", "coreml", "--out", str(out)], out)
    assert "LM head" in msg
    msg = one_line_error(base + ["--target-option", "coreml.no_such=1"], out)
    assert "deployment_target" in msg  # lists the options it has
    msg = one_line_error(base + ["--target-option", "executorch.llama_sdpa=false"], out)
    assert "not among --target" in msg
    msg = one_line_error(base + ["--prefill-chunk", "1"], out)
    assert "--prefill-chunk" in msg


def test_weight_file_limit_checked_after_quantizing(checkpoints, tmp_path):
    """A checkpoint the export quantizes first is checked before conversion, from the quantized model: one line,
    no bundle (the atomic bundle directory is dropped)."""
    out = tmp_path / "bundle"
    msg = one_line_error(["export", "--checkpoint", str(checkpoints["smallthinker"]), "--target", "coreml", "--quant",
                          "int4", "--group-size", "16", "--max-context", "64", "--out", str(out), "--target-option",
                          "coreml.max_weight_file_bytes=100000"], out, stages=True)
    assert "MiB" in msg and "weight file" in msg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left either


# ---------------------------------------------------------------------------------------------- longer cases
@pytest.mark.slow
@pytest.mark.parametrize("name,quant", [("smallthinker", "int4"), ("minimax", "int8"), ("smallthinker", "nf4"),
                                        ("minimax", "any4")])
def test_parity_other_schemes(checkpoints, tmp_path, name, quant):
    """int4 / int8 (constexpr_blockwise_shift_scale), nf4 (shared LUT) and any4 on the other families."""
    bundle = tmp_path / "b"
    extra = [] if quant == "int8" else ["--group-size", "16"]
    r = runner.invoke(app, ["export", "--checkpoint", str(checkpoints[name]), "--target", "coreml", "--quant", quant,
                            "--max-context", str(MAX_CONTEXT), "--prefill-chunk", "32", "--out", str(bundle), *extra])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["parity", str(bundle)])
    assert r.exit_code == 0, r.output
    constexpr = {"int4": "constexpr_blockwise_shift_scale", "int8": "constexpr_blockwise_shift_scale",
                 "nf4": "constexpr_lut_to_dense", "any4": "constexpr_lut_to_dense"}[quant]
    ops = {op.op_type for fn in saved_program(bundle).functions.values() for op in all_ops(fn)}
    assert constexpr in ops


HOT, HOT_SCALE = 4, 300


@pytest.mark.slow
def test_fp16_norms_survive_activations_that_overflow_naive_fp16(checkpoints, tmp_path):
    """Embedding rows 300x larger (x scale_emb: |x| > 256 enters the norms, so a naive fp16 RMSNorm's x^2 is inf):
    the package's RescaledRMSNorm keeps every fp16-mode logit finite and the greedy tokens the reference's. The
    test reads the largest |x| any norm received (trace of the fp16 program)."""
    from safetensors.numpy import load_file, save_file

    from pocketllm.runtime_py import ReferenceModel
    from pocketllm.runtime_py.runners.coreml import CoreMLEngine

    ckpt = tmp_path / "hot"
    shutil.copytree(checkpoints["minicpm4_dense"], ckpt)
    (shard,) = ckpt.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"][-HOT:] *= HOT_SCALE
    save_file(tensors, shard, metadata={"format": "pt"})
    bundle = tmp_path / "bundle"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "coreml", "--max-context", "64",
                            "--prefill-chunk", "32", "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    V = manifest_of(bundle)["model"]["vocab_size"]
    prompt = np.array([3, V - 1, 7, V - 2, V - 3, 9, V - 4, 11] * 4)
    engine = CoreMLEngine(bundle, mode="fp16")
    reference = ReferenceModel.from_checkpoint(bundle / "reference", max_context=64, float_weights="float16")
    got, want = engine.forward(prompt, 0), reference.forward(prompt, 0)
    engine.reset()
    values = engine.program.trace("prefill", {"tokens": prompt[None].astype(np.int32), "position": np.int32([0])})
    abs_inputs = [op.inputs["x"][0][1] for op in engine.program.package.functions["prefill"].ops
                  if op.type == "abs" and op.inputs["x"][0][0] == "name"]
    assert max(float(np.abs(values[n]).max()) for n in abs_inputs if n in values) > 256  # naive fp16: x^2 = inf
    assert np.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.25 * HOT_SCALE / 10)
