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
