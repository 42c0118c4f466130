"""ExecuTorch target end to end: `pocketllm export` -> .pte bundle -> ExecuTorch runtime -> `pocketllm parity`.

Checkpoints are the tiny presets cut to 1-2 layers (lowering cost grows with the graph, ~15-40 s per bundle on two
cores) while keeping every feature: MiniCPM4 dense (llama::custom_sdpa) and InfLLM v2 with sparse selection engaged,
SmallThinker MoE with NoPE + sliding-window layers (experts stacked in the .pte on pocketllm::moe_ffn, and in
experts.bin through the expert store), MiniMax lightning + softmax layers with SwiGLU experts. The lowerings happen
once per session (module fixtures); each test then only runs the .pte.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from pocketllm.export.atomic import atomic_directory
from pocketllm.export.checkpoint_writer import write_weights
from pocketllm.export.families import get_family
from pocketllm.export.init_checkpoint import BUILTIN_TEXT, random_tensors
from pocketllm.export.tokenizer import write_tokenizer
from pocketllm.export.families import preset_config
from pocketllm.export.families import spec_from_config
from tests.kernels import build_kernels

MAX_CONTEXT = 320
BF16_VALUED = ("minicpm4_infllm", "smallthinker")  # tied and untied embeddings: the .pte gathers from a bf16 table
runner = CliRunner()


def ascii_tokenizer(vocab_size: int, specials: list[str]):
    """Byte-level BPE trained on ASCII text only, padded with plain-word tokens to vocab_size: every id decodes to
    valid UTF-8 on its own, which ExecuTorch's runner needs to hand each token piece to Python."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pocketllm.runtime_py.parity import DEFAULT_PROMPTS

    text = "".join(c for c in BUILTIN_TEXT + " ".join(DEFAULT_PROMPTS) if ord(c) < 128)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 4, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                    show_progress=False))
    tok.add_tokens([f" w{i}" for i in range(tok.get_vocab_size(), vocab_size)])
    return tok


def make_checkpoint(out: Path, config: dict, seed: int, ascii_only: bool = False, bf16_values: bool = False) -> Path:
    """A random fp32 checkpoint for an arbitrary config (init-checkpoint's writer, any layer count). bf16_values:
    every value exactly a bf16 number, as when a released bf16 checkpoint is loaded."""
    import torch

    from pocketllm.export.init_checkpoint import build_tokenizer

    config = dict(config, torch_dtype="float32")
    spec = spec_from_config(config)
    tensors, total = random_tensors(config, torch.float32, seed)
    if bf16_values:
        tensors = ((n, t.to(torch.bfloat16).to(t.dtype) if t.is_floating_point() else t) for n, t in tensors)
    names = list(get_family(spec.family).tokenizer.specials)
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok = ascii_tokenizer(spec.vocab_size, names) if ascii_only else build_tokenizer(spec.vocab_size, names,
                                                                                          [BUILTIN_TEXT] * 4)
        write_tokenizer(tmp, spec.family, tok)
        write_weights(tmp, tensors, total_bytes=total)
    return out


def configs() -> dict[str, dict]:
    mc = preset_config("minicpm4", "tiny")
    dense = dict(mc, num_hidden_layers=1)
    dense.pop("sparse_config")
    # InfLLM v2 always sparse, 1 local + 1 init + 1 top-k block of 64: prompts over 192 tokens drop blocks.
    sparse = dict(mc, num_hidden_layers=1, sparse_config=dict(mc["sparse_config"], window_size=64, topk=1,
                                                             dense_len=-1))
    st = preset_config("smallthinker", "tiny")
    st = dict(st, num_hidden_layers=2, rope_layout=[0, 1], sliding_window_layout=[0, 1])  # NoPE global, SWA+RoPE
    mm = preset_config("minimax", "tiny")
    mm = dict(mm, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    return {"minicpm4_dense": dense, "minicpm4_infllm": sparse, "smallthinker": st, "minimax": mm}


EXPORT_FLAGS = {"smallthinker_file": ["--experts", "file", "--expert-cache-mb", "64"]}  # bundles of another's weights
SAME_WEIGHTS = {"smallthinker_file": "smallthinker"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, bundle), each bundle exported once through the CLI."""
    build_kernels()
    root = tmp_path_factory.mktemp("et")
    out = {}
    for i, (name, cfg) in enumerate(configs().items()):
        ckpt = make_checkpoint(root / f"{name}-ckpt", cfg, seed=10 + i, ascii_only=name == "minicpm4_dense",
                               bf16_values=name in BF16_VALUED)
        out[name] = (ckpt, None)
    for name in [*configs(), *SAME_WEIGHTS]:
        ckpt = out[SAME_WEIGHTS.get(name, name)][0]
        bundle = root / f"{name}-bundle"
        r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "executorch", "--max-context",
                                str(MAX_CONTEXT), "--out", str(bundle), *EXPORT_FLAGS.get(name, [])])
        assert r.exit_code == 0, r.output
        out[name] = (ckpt, bundle)
    return out


@pytest.mark.parametrize("name", ["minicpm4_dense", "minicpm4_infllm", "smallthinker", "minimax"])
def test_parity_fp32(bundles, name):
    """fp32 .pte vs the numpy reference: max |delta logit| <= 1e-3, identical 64-token greedy continuations."""
    _, bundle = bundles[name]
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "64"])
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())["executorch"]
    assert report["passed"] and report["continuations_identical"]
    assert report["max_abs_delta"] <= 1e-3
    assert all(p["steps"] == 64 for p in report["prompts"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["executorch"]["passed"]
    if name == "minicpm4_infllm":
        assert report["infllm_engaged"], "no prompt made InfLLM v2 drop a block"


def test_bundle_contents(bundles):
    _, bundle = bundles["minicpm4_infllm"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert {"model.pte", "tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    target = manifest["targets"]["executorch"]
    assert target["file"] == "model.pte" and len(target["sha256"]) == 64
    assert target["size"] == (bundle / "model.pte").stat().st_size
    assert target["requires_kernels"] == ["pocketllm::infllm_attention.out"]  # the op stays whole, no decomposition
    # bf16-valued weights: the gather table is stored in bf16 (tied head keeps fp32); fp32 weights keep fp32.
    assert target["embedding_table_dtype"] == "bf16"
    for name in ("smallthinker", "minimax"):
        t = json.loads((bundles[name][1] / "manifest.json").read_text())["targets"]["executorch"]
        assert t["embedding_table_dtype"] == ("bf16" if name in BF16_VALUED else "fp32")
    assert "llama::update_cache.out" in target["operators"]  # in-place cache writes ...
    assert "aten::slice_scatter.out" not in target["operators"]  # ... never a copy of the whole cache per call
    assert manifest["attention"]["infllm_v2"]["dense_len"] == -1
    assert manifest["model"]["max_context"] == MAX_CONTEXT
    dense = json.loads((bundles["minicpm4_dense"][1] / "manifest.json").read_text())["targets"]["executorch"]
    assert "llama::custom_sdpa.out" in dense["operators"] and dense["llama_sdpa_layers"] == 1
    mm = json.loads((bundles["minimax"][1] / "manifest.json").read_text())["targets"]["executorch"]
    assert mm["requires_kernels"] == ["pocketllm::lightning_attention.out", "pocketllm::moe_ffn.out"]
    assert mm["moe"] == {"experts": "inline", "ops": ["moe_ffn"], "expert_dtype": ["fp32"], "all_experts_layers": []}
    st = json.loads((bundles["smallthinker"][1] / "manifest.json").read_text())["targets"]["executorch"]
    assert st["requires_kernels"] == ["pocketllm::moe_ffn.out"] and st["moe"]["expert_dtype"] == ["bf16"]
    assert "aten::topk.values" in st["operators"]  # the routers stay in the graph; only the experts moved


# ------------------------------------------------------------------------------------------------ expert store
def test_expert_store_bundle(bundles):
    """--experts file: experts.bin beside a .pte that holds no expert weight, listed in the manifest with its
    sha256; the store's id and the export's budget recorded for runtimes."""
    _, bundle = bundles["smallthinker_file"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = manifest["targets"]["executorch"]
    assert target["requires_kernels"] == ["pocketllm::expert_store_moe_ffn.out", "pocketllm::expert_store_prefetch.out"]
    store = target["expert_store"]
    assert store["file"] == "experts.bin" and store["cache_mb"] == 64 and store["prefetch"] == "pre_attention_router"
    assert manifest["files"]["experts.bin"]["size"] == store["bytes"] == (bundle / "experts.bin").stat().st_size
    inline = (bundles["smallthinker"][1] / "model.pte").stat().st_size
    assert (bundle / "model.pte").stat().st_size < inline - store["bytes"] // 2  # the experts left the program


@pytest.mark.parametrize("budget_mb", ["0", "0.04"], ids=["unbounded", "2-slots"])
def test_parity_through_the_expert_store(bundles, monkeypatch, budget_mb):
    """Parity of the file bundle with the store memory-mapped, and with a budget of two expert slots (set at run
    time, overriding the manifest's 64 MiB): every prefill then runs in batches of experts, and experts are evicted
    and read again."""
    from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

    _, bundle = bundles["smallthinker_file"]
    monkeypatch.setenv("POCKETLLM_EXPERT_CACHE_MB", budget_mb)
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "32"])
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())["executorch"]
    assert report["passed"] and report["continuations_identical"] and report["max_abs_delta"] <= 1e-3
    engine = ExecutorchRunner(bundle, verify=False)
    engine.forward(np.arange(3, 60) % 500, 0)
    stats = engine.experts.stats()
    if budget_mb == "0":
        assert stats["slots"] == 0 and stats["evictions"] == 0 and stats["misses"] + stats["hits"] > 0
    else:
        assert stats["slots"] == 2 and stats["evictions"] > 0
        assert stats["peak_resident_bytes"] <= 2 * 20480


def test_damaged_expert_store_in_a_bundle(bundles, tmp_path):
    """Unverified loads (verify=False skips the manifest's sha256) still meet the store's own checks: a truncated
    experts.bin is refused when the runner opens it, a corrupt expert block when a token is first routed to it, each
    with one line."""
    from pocketllm.export.errors import PocketllmError
    from pocketllm.runtime_py.ops.expert_store import ExpertFile
    from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

    bundle = tmp_path / "b"
    shutil.copytree(bundles["smallthinker_file"][1], bundle)
    path = bundle / "experts.bin"
    entry = ExpertFile(path).layers[0]
    data = bytearray(path.read_bytes())
    for e in range(entry.experts):
        data[entry.first_offset + e * entry.block_stride + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    engine = ExecutorchRunner(bundle, verify=False, expert_cache_mb=0)
    with pytest.raises(PocketllmError, match=r"^experts\.bin: layer 0 expert \d fails its checksum \(the file is "
                                             r"corrupt\); re-export the bundle$"):
        engine.forward(np.array([5, 6, 7]), 0)
    # the truncated file is another copy: shrinking a file the first engine's store still maps would be a SIGBUS
    # on its next read (the same for an app that replaces experts.bin under a running model)
    truncated = tmp_path / "t"
    shutil.copytree(bundles["smallthinker_file"][1], truncated)
    (truncated / "experts.bin").write_bytes(bytes(data[:len(data) - 4096]))
    with pytest.raises(PocketllmError, match=r"^experts\.bin: truncated expert store \(\d+ bytes; its header says "):
        ExecutorchRunner(truncated, verify=False)
    r = runner.invoke(app, ["generate", "--engine", "executorch", "--bundle", str(truncated), "--prompt", "x"])
    assert r.exit_code == 2 and "experts.bin: size" in r.output and "does not match manifest.json" in r.output


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_expert_store_through_the_cli(bundles, tmp_path, damage):
    """The manifest's sha256 is the first defence; the store's own checks are the second (an app that does not hash
    gigabytes at every start, a file damaged before its manifest was written). Here manifest.json is made to agree
    with the damaged experts.bin, so the store itself must refuse it: one line, exit 2, through `pocketllm logits`."""
    from pocketllm.export.bundle.manifest import file_entry
    from pocketllm.runtime_py.ops.expert_store import ExpertFile

    bundle = tmp_path / "b"
    shutil.copytree(bundles["smallthinker_file"][1], bundle)
    path = bundle / "experts.bin"
    data = bytearray(path.read_bytes())
    if damage == "corrupt":
        for layer in ExpertFile(path).layers.values():  # every expert of every layer: whichever the router picks
            for e in range(layer.experts):
                data[layer.first_offset + e * layer.block_stride + 100] ^= 0xFF
    else:
        del data[len(data) - 4096:]
    path.write_bytes(bytes(data))
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["experts.bin"] = file_entry(path)
    manifest["targets"]["executorch"]["expert_store"]["bytes"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest, indent=2))
    r = runner.invoke(app, ["logits", "--engine", "executorch", "--bundle", str(bundle), "--tokens", "1,5,9",
                            "--out", str(tmp_path / "l.npy")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    expected = {"corrupt": r"experts\.bin: layer \d+ expert \d+ fails its checksum \(the file is corrupt\); "
                           r"re-export the bundle$",
                "truncated": r"experts\.bin: truncated expert store \(\d+ bytes; its header says "}[damage]
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "l.npy").exists()


def test_bundle_is_relocatable(bundles, tmp_path):
    """A bundle copied elsewhere passes parity there: its reference weights travel inside it and its manifest
    holds no absolute path (no path of the exporting machine at all)."""
    _, original = bundles["minimax"]
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(original, moved)
    text = (moved / "manifest.json").read_text()
    strings = [v for v in re.findall(r'"((?:[^"\\]|\\.)*)"', text)]
    assert not [v for v in strings if v.startswith("/") or str(original.parent) in v]
    r = runner.invoke(app, ["parity", str(moved), "--steps", "8"])
    assert r.exit_code == 0, r.output
    assert json.loads((moved / "parity.json").read_text())["executorch"]["passed"]


def test_constant_methods(bundles):
    from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

    ckpt, bundle = bundles["smallthinker"]
    engine = ExecutorchRunner(bundle)
    spec = spec_from_config(json.loads((ckpt / "config.json").read_text()))
    assert engine.read_constant("get_max_seq_len") == 256  # tokens per call (--prefill-chunk)
    assert engine.read_constant("get_max_context_len") == MAX_CONTEXT
    assert engine.read_constant("get_vocab_size") == spec.vocab_size
    assert engine.read_constant("get_bos_id") == spec.bos_token_id
    assert engine.read_constant("use_kv_cache") is True
    assert engine.read_constant("enable_dynamic_shape") is True
    eos = engine.program.load_method("get_eos_ids").execute([])
    assert list(eos) == list(spec.eos_token_ids)


def test_chunked_prefill_matches_one_call(bundles):
    """Dynamic T: a prompt prefilled in chunks gives the logits of one pass (cache and lightning state); prompts
    longer than the program's T bound (256) are split by the engine."""
    from pocketllm.runtime_py import ReferenceModel
    from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

    for name in ("minimax", "minicpm4_infllm"):
        ckpt, bundle = bundles[name]
        engine = ExecutorchRunner(bundle, verify=False)
        ids = np.arange(3, 3 + 300) % 500
        whole = engine.forward(ids, 0)  # 256 + 44
        engine.reset()
        parts = [engine.forward(ids[s:s + 100], s) for s in range(0, 300, 100)]
        np.testing.assert_allclose(np.concatenate(parts), whole, atol=2e-4)
        ref = ReferenceModel.from_checkpoint(ckpt, max_context=MAX_CONTEXT).forward(ids, 0)
        np.testing.assert_allclose(whole, ref, atol=1e-3)


def test_infllm_rewind_and_new_sequence_match_reference(bundles):
    """The kernel memoises compressed keys per cache buffer: rewinding (start_pos < cached length) and starting a
    new sequence must invalidate exactly the entries whose cache rows were rewritten."""
    from pocketllm.runtime_py import ReferenceModel
    from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

    ckpt, bundle = bundles["minicpm4_infllm"]
    engine = ExecutorchRunner(bundle, verify=False)
    ref = ReferenceModel.from_checkpoint(ckpt, max_context=MAX_CONTEXT)
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, 500, 280), rng.integers(3, 500, 200)
    calls = [(a[:250], 0), (a[250:280], 250), (b[:60], 100), (b[60:61], 160), (b[:200], 0), (a[:40], 200)]
    for tokens, start in calls:  # rewind into the middle, then a new sequence, then a jump back
        np.testing.assert_allclose(engine.forward(tokens, start), ref.forward(tokens, start), atol=1e-3)


def test_logits_and_generate_cli(bundles, tmp_path):
    ckpt, bundle = bundles["minimax"]
    out = tmp_path / "l.npy"
    r = runner.invoke(app, ["logits", "--engine", "executorch", "--bundle", str(bundle), "--tokens", "1,5,9,200",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "r.npy"
    r = runner.invoke(app, ["logits", "--engine", "reference", "--checkpoint", str(ckpt), "--tokens", "1,5,9,200",
                            "--out", str(ref), "--max-context", str(MAX_CONTEXT)])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(out), np.load(ref), atol=1e-3)
    args = ["generate", "--prompt", "It is a truth", "--greedy", "--max-new-tokens", "24"]
    a = runner.invoke(app, args + ["--engine", "executorch", "--bundle", str(bundle)])
    b = runner.invoke(app, args + ["--engine", "reference", "--checkpoint", str(ckpt), "--max-context", "320"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout.splitlines()[0] == b.stdout.splitlines()[0]


RUNNER_SCRIPT = """
import sys
from pocketllm.runtime_py.runners.executorch import load_kernel_library, load_llama_ops
load_llama_ops()
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
bundle, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pieces = []
r = TextLLMRunner(bundle + "/model.pte", bundle + "/tokenizer.json")
r.generate(prompt, GenerationConfig(echo=False, max_new_tokens=n, temperature=0.0, num_bos=int(sys.argv[4])),
           token_callback=pieces.append)
sys.stdout.write("RESULT:" + "".join(pieces))
"""


def test_executorch_llm_runner_matches_pocketllm_generate(bundles):
    """ExecuTorch's own C++ LLM runner (Python binding) on our .pte + tokenizer.json: same greedy text."""
    _, bundle = bundles["minicpm4_dense"]
    prompt, n = "The quick brown fox", 24
    num_bos = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["num_bos"]
    assert num_bos == 1  # MiniCPM4 prompts start with BOS: the bundle's tokenizer.json adds it for the C++ runner
    proc = subprocess.run([sys.executable, "-c", RUNNER_SCRIPT, str(bundle), prompt, str(n), str(num_bos)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = proc.stdout.split("RESULT:", 1)[1]
    r = runner.invoke(app, ["generate", "--engine", "executorch", "--bundle", str(bundle), "--prompt", prompt,
                            "--greedy", "--max-new-tokens", str(n)])
    assert r.exit_code == 0, r.output
    ours = r.stdout[:-1]  # prompt + continuation + "\n" (the speed goes to stderr)
    assert ours == prompt + theirs


# ------------------------------------------------------------------------------------------------ any4
def export_any4(ckpt: Path, out: Path, *extra: str) -> Path:
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--quant", "any4", "--group-size", "16",
                            "--max-context", str(MAX_CONTEXT), "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return out


def check_any4_parity(bundle: Path) -> dict:
    """any4 .pte vs the reference running the same quantized checkpoint (inside the bundle, reference/)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "any4"
    assert "pocketllm::any4_linear.out" in manifest["targets"]["executorch"]["requires_kernels"]
    reference = json.loads((bundle / manifest["reference"]["dir"] / "config.json").read_text())
    assert reference["quantization_config"]["scheme"] == "any4"
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "64"])
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())["executorch"]
    assert report["passed"] and report["continuations_identical"] and report["max_abs_delta"] <= 1e-3
    return report


def pte_constants(pte: Path) -> tuple[list[tuple[str, list[int], int]], list[int]]:
    """The program's constant tensors (dtype, shape, bytes; one entry per stored buffer) and the sizes of the
    XNNPACK delegate blobs (which hold the weights XNNPACK packs)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes()).program
    found = {}
    for plan in program.execution_plan:
        for v in plan.values:
            t = v.val
            if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0:
                found[t.data_buffer_idx] = (t.scalar_type.name, list(t.sizes),
                                            len(program.constant_buffer[t.data_buffer_idx].storage))
    return list(found.values()), [len(d.data) for d in program.backend_delegate_data]


def test_any4_parity_with_infllm(bundles, tmp_path):
    """any4 linears (C++ kernel) and InfLLM v2 (C++ kernel, selection engaged) in one .pte; the default 4-bit export
    stores the tied LM head in 8 bits per channel, once: the embedding gather and the head read one constant."""
    ckpt, _ = bundles["minicpm4_infllm"]
    bundle = export_any4(ckpt, tmp_path / "any4")
    report = check_any4_parity(bundle)
    assert report["infllm_engaged"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    assert (q["lm_head"], q["embedding"], q["tied_embedding"], q["activations"]) == ("int8", "int8", True, "fp32")
    et = manifest["targets"]["executorch"]
    assert "pocketllm::int8_linear.out" in et["requires_kernels"] and et["embedding_table_dtype"] == "int8"
    per_module = et["quantization"]["per_module"]
    assert per_module["lm_head"].startswith("pocketllm::int8_linear") and "tied" in per_module["lm_head"]
    assert per_module["model.layers.0.mlp.up_proj"] == "pocketllm::any4_linear"
    V, H = manifest["model"]["vocab_size"], manifest["model"]["hidden_size"]
    constants, blobs = pte_constants(bundle / "model.pte")
    tables = [c for c in constants if c[1] == [V, H]]
    assert tables == [("CHAR", [V, H], V * H)], tables  # one int8 table, no float copy
    # Norms, RoPE and the SwiGLU product are one pocketllm op each; every linear is ours too, so XNNPACK gets
    # nothing: no one-op partitions (tens of microseconds of dispatch each) between our kernels.
    assert et["elementwise"] == "fused" and et["quantization"]["per_module"]["model.norm"] == "pocketllm::rms_norm"
    assert {"pocketllm::rms_norm.out", "pocketllm::rope.out", "pocketllm::silu_mul.out"} <= set(et["requires_kernels"])
    assert blobs == []


def test_elementwise_on_xnnpack(bundles, tmp_path):
    """executorch.elementwise=xnnpack keeps norms and RoPE as XNNPACK partitions (what a float program gets by
    default, so stock runtimes run it); parity holds either way."""
    ckpt, _ = bundles["minicpm4_dense"]
    bundle = export_any4(ckpt, tmp_path / "any4", "--target-option", "executorch.elementwise=xnnpack")
    report = check_any4_parity(bundle)
    et = json.loads((bundle / "manifest.json").read_text())["targets"]["executorch"]
    assert et["elementwise"] == "xnnpack" and report["max_abs_delta"] <= 1e-3
    assert not {"pocketllm::rms_norm.out", "pocketllm::rope.out"} & set(et["requires_kernels"])
    assert pte_constants(bundle / "model.pte")[1]  # XNNPACK delegate blobs


def test_w4a8_bundle(bundles, tmp_path):
    """--quant any4-w4a8: the decoder's any4 layers on pocketllm::any4_linear_w4a8, the head exact in int8; parity
    against the reference running the same W4A8 numerics."""
    ckpt, _ = bundles["minicpm4_dense"]
    out = tmp_path / "w4a8"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--quant", "any4-w4a8", "--group-size", "16",
                            "--max-context", str(MAX_CONTEXT), "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert (q["scheme"], q["variant"], q["activations"], q["lm_head"]) == ("any4", "any4-w4a8", "int8", "int8")
    et = manifest["targets"]["executorch"]
    assert {"pocketllm::any4_linear_w4a8.out", "pocketllm::int8_linear.out"} <= set(et["requires_kernels"])
    assert "pocketllm::any4_linear.out" not in et["requires_kernels"]
    assert et["quantization"]["w4a8_layers"] == 7
    r = runner.invoke(app, ["parity", str(out), "--steps", "32"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "parity.json").read_text())["executorch"]
    assert report["passed"], (report["contract"], report["quantiles"], report["bounds"])
    assert report["contract"].startswith("W4A8") and report["noise_floor"]["positions"] > 0


@pytest.mark.parametrize("flags,head,kernel", [
    (("--quantize-lm-head",), "any4", "pocketllm::any4_linear"),  # the tied table in any4, gathered and multiplied
    (("--lm-head", "none"), "fp32", None),  # the previous default
])
@pytest.mark.slow  # ~30 s each on the 2-core machine; the default suite's int8 head: test_any4_parity_with_infllm
def test_any4_head_variants_parity(bundles, tmp_path, flags, head, kernel):
    """Every LM head choice of a tied any4 bundle keeps the exact contract (<= 1e-3 vs the reference on the same
    weights, identical continuations); a quantized tied table is stored once."""
    bundle = export_any4(bundles["minicpm4_dense"][0], tmp_path / "any4", *flags)
    check_any4_parity(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    assert (q["lm_head"], q["embedding"], q["tied_embedding"]) == (head, head, True)
    per_module = manifest["targets"]["executorch"]["quantization"]["per_module"]
    if kernel:
        assert per_module["lm_head"].startswith(kernel) and "tied" in per_module["lm_head"]
        V, H = manifest["model"]["vocab_size"], manifest["model"]["hidden_size"]
        constants, _ = pte_constants(bundle / "model.pte")
        assert not [c for c in constants if c[1] == [V, H]]  # packed (no [V, H] table), stored once
        assert sum(1 for c in constants if c[1] == [V, H // 2]) == 1, constants


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smallthinker", "minimax", "minicpm4_dense"])
def test_any4_parity_other_families(bundles, tmp_path, name):
    report = check_any4_parity(export_any4(bundles[name][0], tmp_path / "any4"))
    manifest = json.loads((tmp_path / "any4" / "manifest.json").read_text())
    if name != "minicpm4_dense":  # the routed experts' packed tensors stacked, on the any4 expert kernel
        assert "pocketllm::moe_ffn_any4.out" in manifest["targets"]["executorch"]["requires_kernels"]
    assert report["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("name,budget_mb", [("smallthinker", "0.05"), ("minimax", "0")])
def test_any4_parity_through_the_expert_store(bundles, tmp_path, monkeypatch, name, budget_mb):
    """any4 experts in experts.bin: SmallThinker under a budget of a few experts (prefetched from its pre-attention
    router), MiniMax memory-mapped (its router follows attention: no prefetch)."""
    out = tmp_path / "any4-file"
    r = runner.invoke(app, ["export", "--checkpoint", str(bundles[name][0]), "--quant", "any4", "--group-size", "16",
                            "--max-context", str(MAX_CONTEXT), "--experts", "file", "--out", str(out)])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("POCKETLLM_EXPERT_CACHE_MB", budget_mb)
    check_any4_parity(out)
    store = json.loads((out / "manifest.json").read_text())["targets"]["executorch"]["expert_store"]
    assert store["prefetch"] == ("pre_attention_router" if name == "smallthinker" else "none")


@pytest.mark.slow
def test_8da4w_export_runs(bundles, tmp_path):
    """torchao 8da4w through XNNPACK: no reference runs its activation quantization; top-1 agreement only."""
    ckpt, _ = bundles["minicpm4_dense"]
    out = tmp_path / "8da4w"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--quant", "8da4w", "--max-context",
                            str(MAX_CONTEXT), "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "8da4w"
    r = runner.invoke(app, ["parity", str(out), "--steps", "16"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", ["smallthinker", "minimax"])
def test_all_experts_keeps_the_moe_out_of_xnnpack(bundles, tmp_path, name):
    """--experts all: the per-expert elementwise ops stay out of XNNPACK (its partitioner outgrows the machine on
    the 4B's ~2000 of them), everything else is delegated as usual; parity as for every bundle."""
    ckpt, _ = bundles[name]
    out = tmp_path / "all"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--max-context", str(MAX_CONTEXT), "--experts", "all",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    et = json.loads((out / "manifest.json").read_text())["targets"]["executorch"]
    assert et["delegates"] == ["XnnpackBackend"] and et["moe"]["experts"] == "all"
    assert {"aten::mul.out", "aten::add.out"} <= set(et["operators"])  # the experts' weighting, on ExecuTorch's kernels
    moe_kernels = {k: v for k, v in et["quantization"]["per_module"].items() if "block_sparse_moe" in k}
    assert "linear (portable, fp32)" in moe_kernels.values()  # the router
    assert not any("XNNPACK" in v for v in moe_kernels.values()), moe_kernels
    r = runner.invoke(app, ["parity", str(out), "--steps", "16"])
    assert r.exit_code == 0, r.output


def test_without_xnnpack(bundles, tmp_path):
    """--target-option executorch.xnnpack=false: no delegate in the program, the float ops on ExecuTorch's own
    kernels, the same parity (SmallThinker: the all-experts graph is what needs it, XNNPACK's partitioner outgrows
    the machine on the 4B)."""
    ckpt, _ = bundles["smallthinker"]
    out = tmp_path / "portable"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--max-context", str(MAX_CONTEXT), "--experts", "all",
                            "--target-option", "executorch.xnnpack=false", "--out", str(out)])
    assert r.exit_code == 0, r.output
    et = json.loads((out / "manifest.json").read_text())["targets"]["executorch"]
    assert et["delegates"] == [] and et["moe"]["experts"] == "all"
    assert not any("XNNPACK" in k for k in et["quantization"]["per_module"].values())
    r = runner.invoke(app, ["parity", str(out), "--steps", "16"])
    assert r.exit_code == 0, r.output


def planned_tensors(pte: Path) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of the program's memory-planned tensors (activations and mutable buffers, not constants)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes()).program
    return [(v.val.scalar_type.name, list(v.val.sizes)) for plan in program.execution_plan for v in plan.values
            if type(v.val).__name__ == "Tensor" and v.val.allocation_info is not None]


def test_fp16_kv_cache(bundles, tmp_path):
    """--target-option executorch.kv_cache_dtype=float16: the InfLLM v2 layers' caches are fp16 buffers (half the
    memory and the bytes long-context decode reads), which pocketllm::infllm_attention widens exactly; parity is
    against the reference caching fp16-rounded keys and values, as tight as fp32's."""
    from pocketllm.runtime_py import ReferenceModel

    ckpt, _ = bundles["minicpm4_infllm"]
    out = tmp_path / "kv16"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--max-context", str(MAX_CONTEXT), "--target-option",
                            "executorch.kv_cache_dtype=float16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["executorch"]["kv_cache_dtype"] == "float16"
    spec = manifest["spec"]
    cache = [MAX_CONTEXT, spec["num_kv_heads"], spec["head_dim"]]
    buffers = [t for t in planned_tensors(out / "model.pte") if t[1][1:] == cache]
    assert buffers and {d for d, _ in buffers} == {"HALF"}, buffers  # keys and values of every layer, in fp16

    r = runner.invoke(app, ["parity", str(out), "--steps", "64"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "parity.json").read_text())["executorch"]
    assert report["kv_cache_dtype"] == "float16" and report["infllm_engaged"]
    assert report["passed"] and report["continuations_identical"] and report["max_abs_delta"] <= 1e-3

    # The rounding is real: the fp16-cache reference's logits move away from the fp32-cache reference's.
    ids = np.arange(3, 203) % manifest["model"]["vocab_size"]
    ref = out / manifest["reference"]["dir"]
    exact = ReferenceModel.from_checkpoint(ref, max_context=MAX_CONTEXT).forward(ids, 0)
    rounded = ReferenceModel.from_checkpoint(ref, max_context=MAX_CONTEXT, kv_cache_dtype="float16").forward(ids, 0)
    assert 0 < np.abs(exact - rounded).max() < 0.05


# ------------------------------------------------------------------------------------------------ bad input
def test_8da4w_needs_xnnpack(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--quant", "8da4w",
                            "--target-option", "executorch.xnnpack=false", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2
    assert "--quant 8da4w runs on XNNPACK: it cannot be used with executorch.xnnpack=false" in r.output
    assert not (tmp_path / "b").exists()


def test_fp16_kv_cache_needs_infllm_layers(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--target-option",
                            "executorch.kv_cache_dtype=float16", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2
    assert "executorch.kv_cache_dtype=float16 needs InfLLM v2 attention in every softmax layer" in r.output
    assert "layer 0 attends with 'dense'" in r.output
    assert not (tmp_path / "b").exists()
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--target-option",
                            "executorch.kv_cache_dtype=int8", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "expected one of float32, float16" in r.output


def test_unknown_elementwise_mode(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--target-option",
                            "executorch.elementwise=onednn", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "executorch.elementwise='onednn': expected one of auto, fused, xnnpack" in r.output
    assert not (tmp_path / "b").exists()


def test_unknown_target(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--target", "tflite",
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 2
    assert "unknown --target 'tflite' (supported: " in r.output
    assert not (tmp_path / "b").exists()


def test_max_context_too_large(tiny_dirs, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--max-context", "100000",
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 2
    assert "max_context 100000 must be between 1 and the model's max_position_embeddings (2048)" in r.output
    assert not (tmp_path / "b").exists()


def test_failed_export_leaves_no_bundle(tiny_dirs, tmp_path, monkeypatch):
    from pocketllm.export.errors import PocketllmError
    from pocketllm.export.targets.executorch import lower as et_lower

    def boom(*a, **k):
        raise PocketllmError("lowering failed (injected)")

    monkeypatch.setattr(et_lower, "lower", boom)
    out = tmp_path / "b"
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--out", str(out),
                            "--max-context", "64"])
    assert r.exit_code == 2 and "lowering failed (injected)" in r.output
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary directory


def test_sha256_mismatch(bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["minimax"][1], bundle)
    data = bytearray((bundle / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.pte").write_bytes(bytes(data))
    for args in (["parity", str(bundle)],
                 ["generate", "--engine", "executorch", "--bundle", str(bundle), "--prompt", "x"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2
        assert "model.pte: sha256" in r.output and "does not match manifest.json" in r.output
        assert "Traceback" not in r.output


def test_missing_kernel_library(bundles):
    """A fresh process whose kernel library path is wrong: one line naming the library and the fix."""
    _, bundle = bundles["minicpm4_infllm"]
    proc = subprocess.run([sys.executable, "-m", "pocketllm.export.cli.main", "generate", "--engine", "executorch", "--bundle",
                           str(bundle), "--prompt", "x", "--max-new-tokens", "2"],
                          capture_output=True, text=True, env={**__import__("os").environ,
                                                               "POCKETLLM_KERNELS": "/nonexistent/libk.so"})
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "kernel library /nonexistent/libk.so not found" in err[0]
    assert "make kernels" in proc.stderr
