"""manifest.schema.json and validate_manifest: the contract's manifest validates; each single broken rule is refused
with one line naming the key. (Exported bundles are validated in tests/apps/test_android_core.py.)"""

from __future__ import annotations

import json

import pytest

from pocketllm.export.bundle.schema import load_schema, relpath_pattern, validate_manifest
from pocketllm.export.errors import PocketllmError
from tests.bundle.manifest_cases import MUTATIONS, example_bundle, mutated, with_coreml, with_onnx


@pytest.fixture
def example(tmp_path):
    return example_bundle(tmp_path)[1]


def test_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_contract_example_validates(example):
    validate_manifest(example)
    validate_manifest(json.loads(json.dumps(example)))  # as read back from disk


def test_chat_may_be_null_and_optional_parts_absent(example):
    m = mutated(example, lambda m: m.update(chat=None))
    del m["attention"]["infllm_v2"]
    m["attention"]["per_layer"] = ["dense", "dense"]
    m["parity"] = {"executorch": {"passed": True}}
    validate_manifest(m)


def test_a_package_directory_is_a_target_file_when_its_files_are_listed(example):
    """A Core ML target's `file` is the .mlpackage directory: valid when files lists what is inside it."""
    validate_manifest(mutated(example, with_coreml()))


def test_an_onnx_target_entry_validates(example):
    """The ONNX target's entry as the exporter writes it (folder files listed, genai's I/O names)."""
    validate_manifest(mutated(example, with_onnx()))
    validate_manifest(mutated(example, with_onnx(external_data="onnx/model.onnx.data")))


@pytest.mark.parametrize("name,expect,mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_broken_manifest_is_refused_with_its_key(example, name, expect, mutation):
    with pytest.raises(PocketllmError) as e:
        validate_manifest(mutated(example, mutation))
    message = str(e.value)
    assert expect in message, message
    assert "\n" not in message


@pytest.mark.parametrize("path,ok", [
    ("model.pte", True), ("onnx/model.onnx.data", True), ("model.mlpackage/Data/com.apple.CoreML/weights", True),
    (".hidden", True), ("/abs/model.pte", False), ("../model.pte", False), ("a/../b", False), ("./a", False),
    ("a//b", False), ("a/", False), ("~/x", False), ("C:\\x", False), ("a\\b", False), ("", False),
])
def test_relative_path_pattern(path, ok):
    assert bool(relpath_pattern().search(path)) is ok


def test_not_an_object():
    with pytest.raises(PocketllmError, match="expected a JSON object"):
        validate_manifest([1, 2])


# ------------------------------------------------------------------------------------------ MoE expert store
def with_expert_store(tmp_path, example) -> dict:
    """The example plus an ExecuTorch expert store (SmallThinker exported with --experts file)."""
    import hashlib

    data = b"PLMEXPRT" + bytes(4088)
    (tmp_path / "tiny-example" / "experts.bin").write_bytes(data)
    m = json.loads(json.dumps(example))
    m["files"]["experts.bin"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    m["targets"]["executorch"]["moe"] = {"experts": "file", "ops": ["expert_store_moe_ffn"], "expert_dtype": ["any4"],
                                         "all_experts_layers": []}
    m["targets"]["executorch"]["expert_store"] = {
        "file": "experts.bin", "id": "0123456789abcdef0123456789abcdef", "format_version": 1, "alignment": 16384,
        "layers": [0, 1], "bytes": len(data), "expert_block_bytes": 2048, "cache_mb": 1024,
        "prefetch": "pre_attention_router"}
    return m


def test_expert_store_entries_validate(tmp_path, example):
    m = with_expert_store(tmp_path, example)
    validate_manifest(m)
    m["targets"]["executorch"]["expert_store"]["cache_mb"] = None  # no budget recorded: memory-mapped
    m["targets"]["executorch"]["moe"] = {"experts": "inline", "ops": ["moe_ffn", "moe_ffn_any4"],
                                         "expert_dtype": ["bf16", "any4"], "all_experts_layers": [3]}
    validate_manifest(m)


@pytest.mark.parametrize("path,value,expect", [
    ("expert_store/file", "other.bin", "targets.executorch.expert_store.file: 'other.bin' is not listed in files"),
    ("expert_store/bytes", 8192, "targets.executorch.expert_store.bytes: 8192 is not the size of experts.bin"),
    ("expert_store/id", "XYZ", "targets.executorch.expert_store.id: 'XYZ' does not match"),
    ("expert_store/cache_mb", 0, "targets.executorch.expert_store.cache_mb: 0 is less than the minimum of 1"),
    ("expert_store/prefetch", "always", "targets.executorch.expert_store.prefetch: expected one of"),
    ("expert_store/format_version", 2, "targets.executorch.expert_store.format_version: expected 1"),
    ("moe/experts", "some", "targets.executorch.moe.experts: expected one of inline, file, all"),
    ("moe/ops", ["moe_ffn_fast"], "targets.executorch.moe.ops.0: expected one of"),
])
def test_broken_expert_store_entry_is_refused_with_its_key(tmp_path, example, path, value, expect):
    m = with_expert_store(tmp_path, example)
    node, *keys = path.split("/")
    m["targets"]["executorch"][node][keys[0]] = value
    with pytest.raises(PocketllmError) as e:
        validate_manifest(m)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
