"""Read a saved Core ML package (`.mlpackage`) into plain Python: functions, ops, typed values, weights as numpy.

We parse the package's protobuf (`Data/com.apple.CoreML/model.mlmodel`, an ML Program) ourselves instead of going
through coremltools' `milproto.load`: the proto states each op output's dtype and shape exactly as Core ML sees
them (what fp16 emulation needs), nothing runs type or value inference (seconds on a 0.5B model, and it rewrites
the program: it merges `write_state` + `read_state` into `coreml_update_state`), and the numpy runtime does not
have to import coremltools itself, which pulls in torch and takes ~7 s. Only the generated protobuf schema modules
are borrowed from the installed coremltools (see `_proto_modules`).

Weights live in the package's blob file (MILBlob storage format, `weights/weight.bin`): a 64-byte header, then per
blob a 64-byte metadata record (sentinel 0xDEADBEEF, dtype, size in bytes, data offset) followed by the data, all
64-byte aligned. A `const` names its blob by file and metadata offset. Sub-byte types (int4, uint1..uint6) are
packed from the least significant bit up, in row-major order.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

# MIL DataType enum value -> (name as MIL prints it, numpy container dtype, bits per element)
DTYPES: dict[int, tuple[str, Any, int]] = {
    1: ("bool", np.bool_, 8), 2: ("string", object, 0),
    10: ("fp16", np.float16, 16), 11: ("fp32", np.float32, 32), 12: ("fp64", np.float64, 64),
    21: ("int8", np.int8, 8), 22: ("int16", np.int16, 16), 23: ("int32", np.int32, 32), 24: ("int64", np.int64, 64),
    25: ("int4", np.int8, 4), 31: ("uint8", np.uint8, 8), 32: ("uint16", np.uint16, 16),
    33: ("uint32", np.uint32, 32), 34: ("uint64", np.uint64, 64), 35: ("uint4", np.uint8, 4),
    36: ("uint2", np.uint8, 2), 37: ("uint1", np.uint8, 1), 38: ("uint6", np.uint8, 6), 39: ("uint3", np.uint8, 3),
}
FLOAT_TYPES = ("fp16", "fp32", "fp64")
SUB_BYTE = ("int4", "uint4", "uint2", "uint1", "uint6", "uint3")
BLOB_SENTINEL = 0xDEADBEEF


@dataclass(frozen=True)
class TensorType:
    """A MIL tensor type. dtype: MIL name ("fp16", "int32", ...); shape: ints, None for a dimension only known at
    run time. state: the type is `state<tensor<...>>` (a function input bound to a Core ML state)."""

    dtype: str
    shape: tuple[int | None, ...]
    state: bool = False

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        text = f"tensor<{self.dtype}, [{dims}]>"
        return f"state<{text}>" if self.state else text


@dataclass
class Op:
    """One MIL operation. inputs: parameter -> list of bindings, each ("name", var name) or ("value", array);
    a tuple parameter (concat's `values`) has several bindings."""

    type: str
    name: str
    inputs: dict[str, list[tuple[str, Any]]]
    outputs: list[tuple[str, TensorType]]
    values: dict[str, Any] = field(default_factory=dict)  # const / constexpr attributes ("val", ...)
    blocks: list["Block"] = field(default_factory=list)  # nested blocks (`cond`: the true and false branches)


@dataclass
class Block:
    """A nested block of a control-flow op: its ops (which may read any value defined before the op) and the names
    of the values it returns."""

    inputs: list[tuple[str, TensorType]]
    ops: list[Op]
    outputs: list[str]


@dataclass
class Function:
    name: str
    opset: str
    inputs: list[tuple[str, TensorType]]
    outputs: list[str]
    ops: list[Op]

    @property
    def states(self) -> list[tuple[str, TensorType]]:
        return [(n, t) for n, t in self.inputs if t.state]


@dataclass
class Package:
    path: Path
    specification_version: int
    functions: dict[str, Function]
    default_function: str
    description: Any  # the proto's ModelDescription (feature names, shape ranges); informative only


# ------------------------------------------------------------------------------------------------ protobuf
_PROTO_PACKAGE = "_pocketllm_coreml_proto"


def _proto_modules():
    """The generated `Model_pb2` / `MIL_pb2` modules of the installed coremltools.

    If coremltools is already imported, its own modules. Otherwise the generated files are loaded under a private
    package name without running `coremltools/__init__.py` (which imports torch and the converters). Both register
    identical descriptors in protobuf's default pool, which protobuf accepts; a later `import coremltools` works.
    """
    if "coremltools.proto.Model_pb2" in sys.modules:
        from coremltools.proto import MIL_pb2, Model_pb2

        return Model_pb2, MIL_pb2
    if _PROTO_PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise PocketllmError("reading a Core ML package needs the coremltools package (pip install coremltools)")
        proto_dir = Path(list(spec.submodule_search_locations)[0]) / "proto"
        pkg = types.ModuleType(_PROTO_PACKAGE)
        pkg.__path__ = [str(proto_dir)]
        sys.modules[_PROTO_PACKAGE] = pkg
    model_pb2 = importlib.import_module(f"{_PROTO_PACKAGE}.Model_pb2")
    mil_pb2 = importlib.import_module(f"{_PROTO_PACKAGE}.MIL_pb2")
    return model_pb2, mil_pb2


# ------------------------------------------------------------------------------------------------ weights
class BlobFile:
    """A MILBlob storage file, memory-mapped. `read(offset, dtype, shape)` returns the blob's elements."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise PocketllmError(f"{path}: weight file named by the program is missing")
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        if self.data.size < 64:
            raise PocketllmError(f"{path}: weight file too short ({self.data.size} bytes) for a MILBlob header")
        version = int(self.data[4:8].view(np.uint32)[0])
        if version != 2:
            raise PocketllmError(f"{path}: MILBlob storage version {version}, expected 2")

    def read(self, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        meta = self.data[offset:offset + 64]
        if meta.size < 64 or int(meta[0:4].view(np.uint32)[0]) != BLOB_SENTINEL:
            raise PocketllmError(f"{self.path}: no blob metadata at offset {offset} (sentinel mismatch)")
        size = int(meta[8:16].view(np.uint64)[0])
        start = int(meta[16:24].view(np.uint64)[0])
        raw = self.data[start:start + size]
        if raw.size != size:
            raise PocketllmError(f"{self.path}: blob at {offset} runs past the end of the file")
        return decode_bytes(raw, dtype, shape, where=f"{self.path}@{offset}")


def decode_bytes(raw, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Elements of `dtype` (MIL name) packed in `raw` (bytes or uint8 array), reshaped to `shape`."""
    count = int(np.prod(shape, dtype=np.int64))
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else np.asarray(raw)
    if dtype in SUB_BYTE:
        nbits = {"int4": 4, "uint4": 4, "uint2": 2, "uint1": 1, "uint6": 6, "uint3": 3}[dtype]
        if buf.size * 8 < count * nbits:
            raise PocketllmError(f"{where}: {buf.size} bytes cannot hold {count} {dtype} values")
        if 8 % nbits == 0:  # 1, 2, 4 bits: whole elements per byte, lowest bits first
            shifts = np.arange(0, 8, nbits, dtype=np.uint8)
            values = ((buf[:, None] >> shifts) & np.uint8((1 << nbits) - 1)).reshape(-1)[:count]
        else:  # 3, 6 bits straddle bytes
            bits = np.unpackbits(buf, bitorder="little")[:count * nbits].reshape(count, nbits)
            values = (bits.astype(np.uint16) << np.arange(nbits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)
        if dtype == "int4":  # two's complement nibble
            return (values.astype(np.int8) - np.int8(16) * (values >= 8)).reshape(shape)
        return values.reshape(shape)
    np_dtype = np.dtype(_numpy_dtype(dtype))
    if buf.size != count * np_dtype.itemsize:
        raise PocketllmError(f"{where}: {buf.size} bytes for {count} {dtype} values (expected "
                             f"{count * np_dtype.itemsize})")
    return np.frombuffer(buf.tobytes(), dtype=np_dtype).reshape(shape)


def _numpy_dtype(dtype: str):
    for name, np_dtype, _ in DTYPES.values():
        if name == dtype:
            return np_dtype
    raise PocketllmError(f"unsupported MIL dtype {dtype}")


# ------------------------------------------------------------------------------------------------ values
def _tensor_type(value_type, where: str) -> TensorType:
    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        inner = _tensor_type(value_type.stateType.wrappedType, where)
        return TensorType(inner.dtype, inner.shape, state=True)
    if kind != "tensorType":
        raise PocketllmError(f"{where}: MIL value type '{kind}' is not supported (tensors and states only)")
    t = value_type.tensorType
    if t.dataType not in DTYPES:
        raise PocketllmError(f"{where}: MIL data type {t.dataType} is not supported")
    dims = []
    for d in t.dimensions:
        if d.WhichOneof("dimension") == "constant":
            dims.append(int(d.constant.size))
        elif d.unknown.variadic:
            raise PocketllmError(f"{where}: variadic-rank tensors are not supported")
        else:
            dims.append(None)
    return TensorType(DTYPES[t.dataType][0], tuple(dims))


def _value(value, blobs: "BlobStore", where: str) -> Any:
    """A MIL Value -> numpy array (its declared dtype; sub-byte types unpacked) or str for string scalars."""
    t = _tensor_type(value.type, where)
    if any(d is None for d in t.shape):
        raise PocketllmError(f"{where}: a constant value has an unknown dimension")
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        return blobs.read(value.blobFileValue.fileName, value.blobFileValue.offset, t.dtype, t.shape)
    if kind != "immediateValue" or value.immediateValue.WhichOneof("value") != "tensor":
        raise PocketllmError(f"{where}: only tensor values are supported (got {kind})")
    tv = value.immediateValue.tensor
    which = tv.WhichOneof("value")
    if which == "strings":
        strings = list(tv.strings.values)
        return strings[0] if t.shape == () and len(strings) == 1 else np.array(strings, dtype=object).reshape(t.shape)
    if which == "bytes":
        return decode_bytes(tv.bytes.values, t.dtype, t.shape, where)
    raw = {"floats": tv.floats, "ints": tv.ints, "bools": tv.bools, "longInts": tv.longInts,
           "doubles": tv.doubles}.get(which)
    if raw is None:
        raise PocketllmError(f"{where}: tensor value kind '{which}' is not supported")
    data = np.array(list(raw.values))
    count = int(np.prod(t.shape, dtype=np.int64))
    if data.size == 0 and count > 0:
        raise PocketllmError(f"{where}: empty immediate value for a tensor of {count} elements")
    if data.size == 1 and count != 1:
        data = np.full(count, data[0])
    return data.astype(_numpy_dtype(t.dtype)).reshape(t.shape)


class BlobStore:
    """The package's weight files, opened on first use. Blob file names look like `@model_path/weights/weight.bin`
    where @model_path is the folder holding model.mlmodel."""

    def __init__(self, model_dir: Path):
        self.model_dir, self.files = model_dir, {}
        self.blobs: dict[tuple, np.ndarray] = {}  # one array per blob: functions of a multifunction package share it

    def read(self, file_name: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        rel = file_name.replace("@model_path/", "", 1) if file_name.startswith("@model_path/") else file_name
        path = self.model_dir / rel
        key = (path, offset, dtype, tuple(shape))
        if key not in self.blobs:
            if path not in self.files:
                self.files[path] = BlobFile(path)
            self.blobs[key] = self.files[path].read(offset, dtype, shape)
        return self.blobs[key]


# ------------------------------------------------------------------------------------------------ program
def _root_model(package: Path) -> Path:
    """model.mlmodel inside an .mlpackage, as its Manifest.json names it (or the usual place)."""
    manifest = package / "Manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            entry = info["itemInfoEntries"][info["rootModelIdentifier"]]
            return package / "Data" / entry["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PocketllmError(f"{manifest}: not a Core ML package manifest (rootModelIdentifier / "
                                 "itemInfoEntries)") from None
    return package / "Data" / "com.apple.CoreML" / "model.mlmodel"


def load_package(path: str | Path) -> Package:
    """Read an `.mlpackage` directory: every function of its ML Program, with constants and weights as numpy."""
    package = Path(path)
    if not package.is_dir():
        raise PocketllmError(f"{package}: Core ML package directory not found")
    model_file = _root_model(package)
    if not model_file.is_file():
        raise PocketllmError(f"{model_file}: model spec missing from the Core ML package")
    model_pb2, _ = _proto_modules()
    spec = model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise PocketllmError(f"{model_file}: not a Core ML model spec ({e})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise PocketllmError(f"{model_file}: model type '{spec.WhichOneof('Type')}' is not an ML Program")
    blobs = BlobStore(model_file.parent)
    functions = {name: _function(name, f, blobs, model_file) for name, f in spec.mlProgram.functions.items()}
    default = spec.description.defaultFunctionName or ("main" if "main" in functions else next(iter(functions)))
    return Package(package, int(spec.specificationVersion), functions, default, spec.description)


def _function(name: str, f, blobs: BlobStore, model_file: Path) -> Function:
    where = f"{model_file}: function '{name}'"
    if f.opset not in f.block_specializations:
        raise PocketllmError(f"{where}: no block for its opset {f.opset}")
    block = f.block_specializations[f.opset]
    inputs = [(i.name, _tensor_type(i.type, f"{where} input '{i.name}'")) for i in f.inputs]
    ops = [_op(o, blobs, where) for o in block.operations]
    return Function(name, f.opset, inputs, list(block.outputs), ops)


def _op(o, blobs: BlobStore, where: str) -> Op:
    name = o.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in o.attributes else ""
    here = f"{where}, op '{name or o.type}' ({o.type})"
    blocks = []
    for k, b in enumerate(o.blocks):
        block_inputs = [(i.name, _tensor_type(i.type, f"{here} block {k} input '{i.name}'")) for i in b.inputs]
        blocks.append(Block(block_inputs, [_op(x, blobs, f"{here} block {k}") for x in b.operations],
                            list(b.outputs)))
    inputs = {}
    for param, arg in o.inputs.items():
        bindings = []
        for b in arg.arguments:
            if b.WhichOneof("binding") == "name":
                bindings.append(("name", b.name))
            else:
                bindings.append(("value", _value(b.value, blobs, f"{here} input '{param}'")))
        inputs[param] = bindings
    outputs = [(out.name, _tensor_type(out.type, f"{here} output '{out.name}'")) for out in o.outputs]
    values = {k: _value(v, blobs, f"{here} attribute '{k}'") for k, v in o.attributes.items() if k != "name"}
    return Op(o.type, name, inputs, outputs, values, blocks)
