"""A schema-2 manifest in the contract's shape (CONTRACTS.md) over real files, and single-rule mutations of any
manifest: what export/bundle/schema.py and android_demo/core's ManifestParser must both refuse, with the same key
path in the message. Used by tests/bundle/test_schema.py and tests/apps (which hands them to the Kotlin tests)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from pocketllm.export.families.minicpm4 import CHATML


def _entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def example_bundle(root: Path, name: str = "tiny-example") -> tuple[Path, dict[str, Any]]:
    """A bundle directory whose files are small stand-ins (the manifest's hashes and sizes are theirs) and its
    manifest dict, shaped like the contract's example: MiniCPM4 ChatML, any4 + InfLLM v2, ExecuTorch target."""
    d = root / name
    (d / "reference").mkdir(parents=True, exist_ok=True)
    files = {
        "model.pte": b"PTE0" + bytes(range(256)) * 4,
        "tokenizer.json": json.dumps({"added_tokens": [{"id": 2, "content": "</s>"},
                                                       {"id": 73440, "content": "<|im_end|>"}]}).encode(),
        "tokenizer_config.json": json.dumps({"chat_template": CHATML, "bos_token": "<s>"}).encode(),
        "reference/config.json": b'{"architectures": ["MiniCPMForCausalLM"]}',
    }
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    entries = {rel: _entry(d / rel) for rel in files}
    runtime = {k: v for k, v in entries.items() if not k.startswith("reference/")}
    role = lambda r: {"prefix": f"<|im_start|>{r}\n", "suffix": "<|im_end|>\n"}  # noqa: E731
    manifest = {
        "schema_version": 2,
        "generator": {"name": "pocketllm", "version": "0.2.0"},
        "name": name,
        "architecture": "minicpm4",
        "model_type": "minicpm",
        "source": {"checkpoint": "tiny-austen", "weight_dtype": "BF16", "config_sha256": "0" * 64},
        "model": {"vocab_size": 73448, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "head_dim": 16, "max_context": 320, "max_position_embeddings": 32768, "prefill_chunk": 256},
        "tokenizer": {"files": ["tokenizer.json", "tokenizer_config.json"], "kind": "huggingface",
                      "file": "tokenizer.json", "bos_id": 1, "eos_ids": [2, 73440], "num_bos": 1,
                      "chat_template": CHATML},
        "chat": {"roles": {"system": role("system"), "user": role("user"), "assistant": role("assistant")},
                 "generation_prefix": "<|im_start|>assistant\n", "stop_ids": [73440]},
        "quantization": {"scheme": "any4", "group_size": 128, "bits_per_weight": 4.25},
        "attention": {"per_layer": ["infllm", "infllm"], "rope_per_layer": [True, True],
                      "sliding_window_per_layer": [None, None],
                      "infllm_v2": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                                    "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192,
                                    "score_rule": "upstream"}},
        "targets": {"executorch": {
            "file": "model.pte", "format_version": 1,
            "methods": ["forward", "get_bos_id", "get_eos_ids", "get_max_seq_len", "get_max_context_len"],
            "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"]},
                       {"name": "start_pos", "dtype": "int64", "shape": [1]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", 73448]}],
            "requires_kernels": ["pocketllm::infllm_attention.out", "pocketllm::any4_linear.out"],
            "prefill_chunk": 256}},
        "files": runtime,
        "reference": {"dir": "reference", "files": {"reference/config.json": entries["reference/config.json"]}},
        "spec": {"family": "minicpm4", "vocab_size": 73448, "num_layers": 2, "layers": []},
        "export": {"timings": {"export_s": 1.5, "total_s": 9.0}, "peak_rss_mib": 512.0},
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return d, manifest


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        *parents, last = path.split("/")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return apply


def _delete(path: str) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        *parents, last = path.split("/")
        node = m
        for p in parents:
            node = node[p]
        del node[last]
    return apply


def _pte(m: dict) -> str:
    return m["targets"]["executorch"]["file"]


def with_coreml(**changes) -> Callable[[dict], None]:
    """Add a Core ML target whose artifact is a package directory (its one file listed under it), with `changes`
    to its entry: valid as it is, so that each change breaks one rule."""
    def io(name: str, role: str, dtype: str, shape: list) -> dict:
        return {"name": name, "role": role, "dtype": dtype, "shape": shape}

    def apply(m: dict) -> None:
        m["files"]["model.mlpackage/Manifest.json"] = {"sha256": "0" * 64, "size": 1}
        vocab = m["model"]["vocab_size"]
        entry = {"file": "model.mlpackage", "deployment_target": "iOS18", "compute_precision": "float16",
                 "functions": {f: {"name": f, "inputs": [io("tokens", "tokens", "int32", [1, t]),
                                                         io("position", "position", "int32", [1])],
                                   "outputs": [io("logits", "logits", "float32", [1, t, vocab])]}
                               for f, t in (("prefill", 64), ("decode", 1))},
                 "states": [{"name": "k_cache", "dtype": "float16", "shape": [1, 64, 2, 16]}],
                 "prefill_chunk": 64, "requires_kernels": [], "pad_token_id": -1, "pads_prefill": True,
                 "rewinds": True, "float_weights": "float16"}
        entry.update(changes)
        m["targets"]["coreml"] = entry
    return apply


ONNX_FILES = {"onnx/model.onnx": b"ONNX" + bytes(range(256)) * 2,
              "onnx/genai_config.json": b'{"model": {"type": "decoder"}}',
              "onnx/tokenizer.json": b"{}"}


def with_onnx(**changes) -> Callable[[dict], None]:
    """Add an ONNX target entry as `pocketllm export --target onnx` writes it (its folder's files listed), with
    `changes` to the entry (value None deletes the key): valid as it is, so that each change breaks one rule."""
    def apply(m: dict) -> None:
        for rel, data in ONNX_FILES.items():
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        kv = [1, m["model"]["num_kv_heads"], "past_sequence_length", m["model"]["head_dim"]]
        entry = {"dir": "onnx", "file": "onnx/model.onnx", "format_version": 1, "external_data": None,
                 "genai_config": "onnx/genai_config.json",
                 "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "sequence_length"]},
                            {"name": "attention_mask", "dtype": "int64", "shape": [1, "total_sequence_length"]},
                            {"name": "past_key_values.0.key", "dtype": "float32", "shape": kv},
                            {"name": "past_key_values.0.value", "dtype": "float32", "shape": kv}],
                 "outputs": [{"name": "logits", "dtype": "float32",
                              "shape": [1, "sequence_length", m["model"]["vocab_size"]]},
                             {"name": "present.0.key", "dtype": "float32", "shape": kv},
                             {"name": "present.0.value", "dtype": "float32", "shape": kv}],
                 "kv_layers": [0], "state_layers": [], "requires_kernels": [], "prefill_chunk": 256,
                 "past_present_share_buffer": False, "opset": {"ai.onnx": 21},
                 "operators": ["ai.onnx::MatMul", "com.microsoft::MatMulNBits"]}
        for key, value in changes.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        m["targets"]["onnx"] = entry
    return apply


def example_bundle_with_onnx(root: Path, name: str = "tiny-example-onnx") -> tuple[Path, dict[str, Any]]:
    """The example bundle with an ONNX target beside its ExecuTorch one, the ONNX folder's files written."""
    d, manifest = example_bundle(root, name)
    for rel, data in ONNX_FILES.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    with_onnx()(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return d, manifest


def _unlisted_package(m: dict) -> None:
    with_coreml()(m)
    del m["files"]["model.mlpackage/Manifest.json"]


# (name, text both validators' messages must contain, mutation). Each breaks exactly one rule.
MUTATIONS: list[tuple[str, str, Callable[[dict], None]]] = [
    ("schema_version 1", "unknown schema_version 1", _set("schema_version", 1)),
    ("schema_version 3", "unknown schema_version 3", _set("schema_version", 3)),
    ("no tokenizer", "manifest.json: (top level): missing key 'tokenizer'", _delete("tokenizer")),
    ("unknown top-level key", "manifest.json: (top level): unknown key 'extra'", _set("extra", 1)),
    ("generator name", "manifest.json: generator.name:", _set("generator/name", "someone-else")),
    ("bundle name with a slash", "manifest.json: name:", _set("name", "my bundle/v2")),
    ("architecture", "manifest.json: architecture:", _set("architecture", "llama")),
    ("checkpoint path", "manifest.json: source.checkpoint:", _set("source/checkpoint", "/home/me/ckpt")),
    ("weight dtype", "manifest.json: source.weight_dtype:", _set("source/weight_dtype", "bfloat16")),
    ("zero context", "manifest.json: model.max_context:", _set("model/max_context", 0)),
    ("string vocab size", "manifest.json: model.vocab_size:", _set("model/vocab_size", "512")),
    ("unknown model key", "manifest.json: model: unknown key 'rope'", _set("model/rope", 10000)),
    ("tokenizer kind", "manifest.json: tokenizer.kind:", _set("tokenizer/kind", "tiktoken")),
    ("two BOS", "manifest.json: tokenizer.num_bos:", _set("tokenizer/num_bos", 2)),
    ("no EOS", "manifest.json: tokenizer.eos_ids:", _set("tokenizer/eos_ids", [])),
    ("repeated EOS", "manifest.json: tokenizer.eos_ids:", lambda m: m["tokenizer"].update(
        eos_ids=m["tokenizer"]["eos_ids"] + m["tokenizer"]["eos_ids"][:1])),
    ("negative BOS", "manifest.json: tokenizer.bos_id:", _set("tokenizer/bos_id", -1)),
    ("tokenizer file not among files", "manifest.json: tokenizer.file:", _set("tokenizer/file", "tokenizer.model")),
    ("chat as a string", "manifest.json: chat:", _set("chat", "chatml")),
    ("role without prefix", "manifest.json: chat.roles.user: missing key 'prefix'", _delete("chat/roles/user/prefix")),
    ("unknown role", "manifest.json: chat.roles: unknown key 'tool'",
     _set("chat/roles/tool", {"prefix": "", "suffix": ""})),
    ("stop id not an EOS", "manifest.json: chat.stop_ids:", _set("chat/stop_ids", [99999])),
    ("quantization scheme", "manifest.json: quantization.scheme:", _set("quantization/scheme", "q4_0")),
    ("attention kind", "manifest.json: attention.per_layer.0:", _set("attention/per_layer/0", "flash")),
    ("attention length", "manifest.json: attention.rope_per_layer:",
     lambda m: m["attention"]["rope_per_layer"].append(True)),
    ("no targets", "manifest.json: targets:", _set("targets", {})),
    ("unknown target", "manifest.json: targets: unknown key 'tflite'", _set("targets/tflite", {"file": "m.tflite"})),
    ("program not .pte", "manifest.json: targets.executorch.file:", _set("targets/executorch/file", "model.bin")),
    ("program not listed", "manifest.json: targets.executorch.file:",
     _set("targets/executorch/file", "other.pte")),
    ("no forward method", "manifest.json: targets.executorch.methods:",
     _set("targets/executorch/methods", ["get_bos_id"])),
    ("kernel name", "manifest.json: targets.executorch.requires_kernels.0:",
     _set("targets/executorch/requires_kernels", ["infllm_attention"])),
    ("input dtype", "manifest.json: targets.executorch.inputs.0.dtype:",
     _set("targets/executorch/inputs/0/dtype", "long")),
    ("upper-case sha256", "manifest.json: files.", lambda m: m["files"][_pte(m)].update(
        sha256=m["files"][_pte(m)]["sha256"].upper())),
    ("negative size", "manifest.json: files.", lambda m: m["files"][_pte(m)].update(size=-1)),
    ("path escaping the bundle", "manifest.json: files:", lambda m: m["files"].__setitem__(
        "../escape.bin", {"sha256": "0" * 64, "size": 1})),
    ("absolute path key", "manifest.json: files:", lambda m: m["files"].__setitem__(
        "/data/local/tmp/x.bin", {"sha256": "0" * 64, "size": 1})),
    ("reference outside its dir", "manifest.json: reference.files:", _set("reference/files", {
        "config.json": {"sha256": "0" * 64, "size": 1}})),
    ("absolute path in an open object", "manifest.json: quantization.checkpoint:",
     _set("quantization/checkpoint", "/home/me/out/tiny.any4-checkpoint")),
    ("export without peak RSS", "manifest.json: export: missing key 'peak_rss_mib'", _delete("export/peak_rss_mib")),
    ("Core ML package not listed", "manifest.json: targets.coreml.file:", _unlisted_package),
    ("Core ML pad id", "manifest.json: targets.coreml.pad_token_id:", with_coreml(pad_token_id=-2)),
    ("Core ML weight precision", "manifest.json: targets.coreml.float_weights:",
     with_coreml(float_weights="bfloat16")),
    ("ONNX model not .onnx", "manifest.json: targets.onnx.file:", with_onnx(file="onnx/model.ort")),
    ("ONNX without genai_config", "manifest.json: targets.onnx: missing key 'genai_config'",
     with_onnx(genai_config=None)),
    ("ONNX custom kernel", "manifest.json: targets.onnx.requires_kernels.0:",
     with_onnx(requires_kernels=["infllm_attention"])),
]


def mutated(manifest: dict[str, Any], mutation: Callable[[dict], None]) -> dict[str, Any]:
    m = copy.deepcopy(manifest)
    mutation(m)
    return m
