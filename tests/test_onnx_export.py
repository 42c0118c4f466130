"""ONNX target end to end: `pocketllm export --target onnx` -> BUNDLE/onnx/ -> onnxruntime (runtime_py/runners/onnx.py)
and onnxruntime-genai (its own generator loop) -> `pocketllm parity` against the numpy reference.

Checkpoints are the tiny presets cut to 1-2 layers (tests/test_executorch_export.configs(): MiniCPM4 dense, and
InfLLM v2 with 1 init + 1 local + 1 top-k block of 64, dense below 160 tokens (an ONNX If), so that calls reaching
over 192 tokens drop blocks;
SmallThinker MoE with NoPE + sliding-window layers; MiniMax lightning + softmax layers), with ASCII tokenizers (every
id decodes on its own, so genai's and our detokenizers can be compared on any generated id). Each bundle is exported
once per module, on first use (~10-25 s each on two busy cores); the default suite exports three.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from tests.test_executorch_export import configs, make_checkpoint

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_CONTEXT = 320
runner = CliRunner()


def export(ckpt: Path, out: Path, *args: str) -> Path:
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "onnx", "--max-context",
                            str(MAX_CONTEXT), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    return out


def parity(bundle: Path, steps: int = 64) -> dict:
    r = runner.invoke(app, ["parity", str(bundle), "--steps", str(steps)])
    assert r.exit_code == 0, r.output
    return json.loads((bundle / "parity.json").read_text())["onnx"]


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def onnx_configs() -> dict[str, dict]:
    """tests/test_executorch_export.configs(), with InfLLM v2 dense below 160 tokens (an ONNX If picks the dense or
    the sparse branch per call: the built-in prompts run dense but the 256-token one, which drops blocks)."""
    cfgs = configs()
    sparse = cfgs["minicpm4_infllm"]
    cfgs["minicpm4_infllm"] = dict(sparse, sparse_config=dict(sparse["sparse_config"], dense_len=160))
    return cfgs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-ckpt")
    return {name: make_checkpoint(root / name, cfg, seed=20 + i, ascii_only=True)
            for i, (name, cfg) in enumerate(onnx_configs().items())}


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory):
    """bundles(name) -> (checkpoint, bundle), the fp32 bundle exported through the CLI on first use."""
    root = tmp_path_factory.mktemp("onnx")
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            made[name] = (checkpoints[name], export(checkpoints[name], root / name))
        return made[name]

    return get


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["minicpm4_infllm", "smallthinker", "minimax",
                                  pytest.param("minicpm4_dense", marks=pytest.mark.slow)])
def test_parity_fp32(bundles, name):
    """fp32 ONNX vs the numpy reference: max |delta logit| <= 1e-3, identical 64-token greedy continuations (five
    built-in prompts); MiniCPM4's InfLLM v2 drops blocks on the long prompt, with the upstream score rule."""
    _, bundle = bundles(name)
    report = parity(bundle)
    assert report["target"] == "onnx" and report["passed"]
    assert report["continuations_identical"] and report["max_abs_delta"] <= 1e-3
    assert all(p["steps"] == 64 for p in report["prompts"])
    if name == "minicpm4_infllm":
        assert report["infllm_engaged"], "no prompt made InfLLM v2 drop a block"
        assert manifest(bundle)["attention"]["infllm_v2"]["score_rule"] == "upstream"


def test_bundle_contents(bundles):
    """The folder genai loads (model, genai_config, tokenizer), standard ops only, genai's I/O names."""
    _, bundle = bundles("minicpm4_infllm")
    m = manifest(bundle)
    target = m["targets"]["onnx"]
    assert target["dir"] == "onnx" and target["file"] == "onnx/model.onnx"
    assert target["genai_config"] == "onnx/genai_config.json" and target["external_data"] is None
    assert {"onnx/model.onnx", "onnx/genai_config.json", "onnx/tokenizer.json", "tokenizer.json"} <= set(m["files"])
    assert target["requires_kernels"] == [] and target["opset"]["ai.onnx"] == 21
    assert all(op.startswith("ai.onnx::") for op in target["operators"]), target["operators"]  # standard ops only
    # InfLLM v2: the selection (exact sums, exp_fixed, top-k) inside the sparse branch of an If (dense_len)
    assert "ai.onnx::If" in target["operators"]
    import onnx

    model = onnx.load(str(bundle / "onnx" / "model.onnx"), load_external_data=False)
    inner = {n.op_type for node in model.graph.node if node.op_type == "If" for a in node.attribute
             for n in a.g.node}
    assert {"TopK", "CumSum", "Round", "Pow"} <= inner
    assert [i["name"] for i in target["inputs"]] == ["input_ids", "attention_mask", "past_key_values.0.key",
                                                     "past_key_values.0.value"]
    assert [o["name"] for o in target["outputs"]] == ["logits", "present.0.key", "present.0.value"]
    config = json.loads((bundle / "onnx" / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder" and config["model"]["context_length"] == MAX_CONTEXT
    assert config["search"]["past_present_share_buffer"] is False and config["search"]["chunk_size"] == 256
    mm = manifest(bundles("minimax")[1])["targets"]["onnx"]
    assert mm["state_layers"] == [0] and mm["kv_layers"] == [1]
    st = manifest(bundles("smallthinker")[1])["targets"]["onnx"]
    assert st["moe_layers_routed"] == 2 and "ai.onnx::NonZero" in st["operators"]  # routed experts only


def test_chunked_prefill_rewind_and_restart(bundles):
    """One graph serves any T: chunks of a prompt give the logits of one call (KV cache and lightning state carried
    by the runner); KV models rewind; a call at position 0 restarts."""
    from pocketllm.runtime_py import ReferenceModel
    from pocketllm.runtime_py.runners.onnx import OnnxEngine

    rng = np.random.default_rng(0)
    for name in ("minimax", "minicpm4_infllm"):
        ckpt, bundle = bundles(name)
        engine = OnnxEngine(bundle, threads=1)
        ids = rng.integers(3, 500, 300)
        whole = engine.forward(ids, 0)
        parts = [engine.forward(ids[s:s + 100], s) for s in range(0, 300, 100)]
        np.testing.assert_allclose(np.concatenate(parts), whole, atol=2e-4)
        ref = ReferenceModel.from_checkpoint(ckpt, max_context=MAX_CONTEXT)
        np.testing.assert_allclose(whole, ref.forward(ids, 0), atol=1e-3)
    ckpt, bundle = bundles("minicpm4_infllm")
    engine, ref = OnnxEngine(bundle, threads=1), ReferenceModel.from_checkpoint(ckpt, max_context=MAX_CONTEXT)
    a, b = rng.integers(3, 500, 280), rng.integers(3, 500, 200)
    for tokens, start in [(a[:250], 0), (a[250:280], 250), (b[:60], 100), (b[60:61], 160), (b[:200], 0)]:
        np.testing.assert_allclose(engine.forward(tokens, start), ref.forward(tokens, start), atol=1e-3)


def test_logits_cli(bundles, tmp_path):
    ckpt, bundle = bundles("smallthinker")
    out, ref = tmp_path / "o.npy", tmp_path / "r.npy"
    r = runner.invoke(app, ["logits", "--engine", "onnx", "--bundle", str(bundle), "--tokens", "1,5,9,200",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["logits", "--engine", "reference", "--checkpoint", str(ckpt), "--tokens", "1,5,9,200",
                            "--out", str(ref), "--max-context", str(MAX_CONTEXT)])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(out), np.load(ref), atol=1e-3)


# ------------------------------------------------------------------------------------------------ quantized
@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=pytest.mark.slow),
                                    pytest.param("any4", marks=pytest.mark.slow)])
def test_quantized_parity(checkpoints, tmp_path, scheme):
    """Quantized weights against the reference on the same quantized checkpoint (the bundle's reference/): int4
    and int8 through com.microsoft::MatMulNBits, any4 through its exact standard-op form; InfLLM v2 engaged."""
    extra = ["--group-size", "16"] if scheme != "int8" else []
    bundle = export(checkpoints["minicpm4_infllm"], tmp_path / scheme, "--quant", scheme, *extra)
    m = manifest(bundle)
    assert m["quantization"]["scheme"] == scheme
    ops_used = m["targets"]["onnx"]["operators"]
    if scheme == "any4":
        assert "com.microsoft::MatMulNBits" not in ops_used and "ai.onnx::GatherElements" in ops_used
        assert m["targets"]["onnx"]["linears"] == {"any4 LUT": 7} and m["targets"]["onnx"]["any4_form"] == "lut"
    else:
        assert "com.microsoft::MatMulNBits" in ops_used
        assert m["targets"]["onnx"]["linears"] == {f"MatMulNBits {scheme}": 7}
    report = parity(bundle)
    assert report["passed"] and report["max_abs_delta"] <= 1e-3 and report["continuations_identical"]
    assert report["infllm_engaged"]


@pytest.mark.slow
def test_exact_score_rule(checkpoints, tmp_path):
    """--infllm-scores exact is built into the graph; parity reads the rule from the manifest."""
    bundle = export(checkpoints["minicpm4_infllm"], tmp_path / "exact", "--infllm-scores", "exact")
    assert manifest(bundle)["attention"]["infllm_v2"]["score_rule"] == "exact"
    report = parity(bundle)
    assert report["passed"] and report["infllm_engaged"]


# ------------------------------------------------------------------------------------------------ onnxruntime-genai
GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
folder, prompt, n, num_bos = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = og.Model(folder)
tok = og.Tokenizer(model)
if num_bos:
    tok.update_options(add_special_tokens="true")  # genai's encode adds no BOS unless asked
ids = [int(i) for i in tok.encode(prompt)]
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + n)
gen = og.Generator(model, params)
gen.append_tokens(ids)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print("RESULT:" + json.dumps({"prompt": ids, "tokens": out, "text": tok.decode(out)}))
"""


@pytest.mark.parametrize("name", ["minicpm4_infllm", "smallthinker", pytest.param("minimax", marks=pytest.mark.slow),
                                  pytest.param("minicpm4_dense", marks=pytest.mark.slow)])
def test_onnxruntime_genai_generates_like_pocketllm(bundles, name):
    """onnxruntime-genai's own loop (og.Model on BUNDLE/onnx, og.Tokenizer, og.Generator, greedy) produces the same
    prompt ids, token ids and text as `pocketllm generate` (the numpy reference on the checkpoint). MiniCPM4 with
    InfLLM v2 dropping blocks while genai prefills and decodes; MiniMax: lightning states through genai's
    recurrent-state slots."""
    pytest.importorskip("onnxruntime_genai")
    from pocketllm.export.tokenizer import load_tokenizer
    from pocketllm.runtime_py import ReferenceModel
    from pocketllm.runtime_py.parity import DEFAULT_PROMPTS

    ckpt, bundle = bundles(name)
    # InfLLM: a ~230-token prompt (of the 320 the bundle holds), so that selection drops blocks as genai prefills
    prompt = DEFAULT_PROMPTS[4][:700] if name == "minicpm4_infllm" else "It is a truth universally acknowledged, that"
    n = 24
    m = manifest(bundle)
    # a separate process: onnxruntime_genai aborts the interpreter (std::terminate) when it cannot load onnxruntime
    proc = subprocess.run([sys.executable, "-c", GENAI_SCRIPT, str(bundle / "onnx"), prompt, str(n),
                           str(m["tokenizer"]["num_bos"])], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.split("RESULT:", 1)[1])
    tok = load_tokenizer(ckpt, m["tokenizer"]["bos_id"])
    assert theirs["prompt"] == tok.encode(prompt)
    r = runner.invoke(app, ["generate", "--engine", "reference", "--checkpoint", str(ckpt), "--prompt", prompt,
                            "--greedy", "--max-new-tokens", str(n), "--max-context", str(MAX_CONTEXT)])
    assert r.exit_code == 0, r.output
    assert prompt + theirs["text"] == r.stdout[:-1]  # genai stops at max_length only (no EOS in 24 random tokens)
    if name == "minicpm4_infllm":
        ref = ReferenceModel.from_checkpoint(ckpt, max_context=MAX_CONTEXT)
        ref.forward(np.asarray(theirs["prompt"] + theirs["tokens"][:-1]), 0)
        sel = ref.last_selection[0]  # [Hkv, T, n_blocks]: the queries genai ran
        assert sel.shape[-1] > 3 and not sel[:, -1].all(), "InfLLM v2 kept every block"


# ------------------------------------------------------------------------------------------------ bad input
def assert_one_line(r, text: str) -> None:
    assert r.exit_code == 2, r.output
    assert text in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and len([s for s in r.output.splitlines() if s.strip()]) <= 3


@pytest.mark.parametrize("args,text", [
    (["--quant", "8da4w"], "--quant 8da4w is ExecuTorch's in-graph scheme"),
    (["--quant", "nf4", "--group-size", "16"], "--quant nf4 is not supported by --target onnx: nf4 has no exact"),
    (["--target-option", "onnx.any4_form=fast"], "onnx.any4_form 'fast' is not one of lut, int4, dequant"),
    (["--quant", "any4", "--group-size", "16", "--target-option", "onnx.opset=19"],
     "onnx.opset 19: the exact any4 form needs opset >= 21"),
])
def test_bad_options_are_one_line_and_write_nothing(checkpoints, tmp_path, args, text):
    out = tmp_path / "b"
    r = runner.invoke(app, ["export", "--checkpoint", str(checkpoints["minicpm4_dense"]), "--target", "onnx",
                            "--out", str(out), *args])
    assert_one_line(r, text)
    assert list(tmp_path.iterdir()) == []


def test_unknown_target(checkpoints, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(checkpoints["minicpm4_dense"]), "--target", "onnxx",
                            "--out", str(tmp_path / "b")])
    assert_one_line(r, "unknown --target 'onnxx' (supported: coreml, executorch, onnx)")
    assert list(tmp_path.iterdir()) == []


def test_nf4_checkpoint_is_refused(checkpoints, tmp_path):
    nf4 = tmp_path / "nf4-ckpt"
    r = runner.invoke(app, ["quantize", "--checkpoint", str(checkpoints["minicpm4_dense"]), "--scheme", "nf4",
                            "--group-size", "16", "--out", str(nf4)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", "--checkpoint", str(nf4), "--target", "onnx", "--out", str(tmp_path / "b")])
    assert_one_line(r, "--quant nf4 is not supported by --target onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nf4-ckpt"]


def test_over_protobuf_limit_without_external_data(checkpoints, tmp_path, monkeypatch):
    """external_data 'never' with weights over protobuf's 2 GiB (the limit lowered to 1 KiB here): one line from
    the plan, before any weight is read, nothing written."""
    import pocketllm.export.targets.onnx as onnx_target

    monkeypatch.setattr(onnx_target, "PROTOBUF_LIMIT", 1024)
    r = runner.invoke(app, ["export", "--checkpoint", str(checkpoints["minicpm4_dense"]), "--target", "onnx",
                            "--target-option", "onnx.external_data=never", "--out", str(tmp_path / "b")])
    assert_one_line(r, "over protobuf's 2 GiB limit for one model.onnx; use onnx.external_data=auto or always")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_external_data(bundles, checkpoints, tmp_path):
    """'auto' above its threshold writes onnx/model.onnx.data, listed in the manifest, read by the runner."""
    from pocketllm.runtime_py.runners.onnx import OnnxEngine

    out = export(checkpoints["minicpm4_dense"], tmp_path / "ext", "--target-option",
                 "onnx.external_data_threshold_mib=0")
    assert (out / "onnx" / "model.onnx.data").is_file()
    m = manifest(out)
    assert m["targets"]["onnx"]["external_data"] == "onnx/model.onnx.data" and "onnx/model.onnx.data" in m["files"]
    ids = np.array([1, 5, 9], dtype=np.int64)
    np.testing.assert_allclose(OnnxEngine(out).forward(ids, 0),
                               OnnxEngine(bundles("minicpm4_dense")[1]).forward(ids, 0), atol=1e-6)


def test_folder_without_genai_config(bundles, tmp_path):
    from pocketllm.export.errors import PocketllmError
    from pocketllm.runtime_py.runners.onnx import OnnxEngine

    folder = tmp_path / "onnx"
    shutil.copytree(bundles("smallthinker")[1] / "onnx", folder)
    (folder / "genai_config.json").unlink()
    with pytest.raises(PocketllmError) as e:
        OnnxEngine(folder)
    assert str(e.value) == (f"{folder / 'genai_config.json'}: not found; an ONNX folder needs genai_config.json next "
                            "to model.onnx (re-export with `pocketllm export --target onnx`)")
