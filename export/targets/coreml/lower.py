"""Core ML lowering: swapped model -> torch.export (one program per function) -> ct.convert -> one multifunction
`.mlpackage` whose functions share weights and states.

    prefill(tokens int32 [1, C], position int32 [1]) -> logits fp32 [1, C, vocab]
    decode (tokens int32 [1, 1], position int32 [1]) -> logits fp32 [1, 1, vocab]       (default function)
    states: every KV cache, InfLLM v2 compressed-key cache and lightning state, fp16, same names in both functions

How an app drives it: `MLModel(contentsOf:configuration:)` once per function (`MLModelConfiguration.functionName`
"prefill" / "decode"), ONE `MLState` from either (`makeState()`; the state descriptions are identical), passed to
every call of both. A prompt of n tokens starting at position p: prefill chunks of C tokens at p, p + C, ...; the
last chunk is padded with token id -1 after its real tokens (logits of the last real token: row (n - 1) % C);
packages with lightning layers (entry `pads_prefill: false`) are never padded: the tail runs through decode. Then
decode one token at a time at the next position. A chunk needs position + C <= max_context (finish a prompt that
ends closer to the end with decode calls). Position 0 starts a new sequence (caches are overwritten, lightning
states reset); any position <= the current length rewinds (not with lightning layers: `rewinds: false`).

Multifunction + states: `ct.utils.save_multifunction` merges the two converted programs and deduplicates their
constants across functions (shared `weight_id`: one copy of every weight in the weight file); each function
declares the same states, and one `MLState` serves both (as the ANEMLL/candle-coreml runtimes do with their
prefill/infer functions). An equivalent without multifunction (one function with enumerated token shapes) would
fix C at load time and cannot switch per call.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pocketllm.export.errors import PocketllmError
from pocketllm.export.spec import ModelSpec
from pocketllm.export.targets.coreml.options import CoreMLOptions
from pocketllm.export.targets.coreml.swaps import PAD_TOKEN_ID, apply_swaps

PACKAGE = "model.mlpackage"
WEIGHTS_REL = Path("Data") / "com.apple.CoreML" / "weights"
FUNCTIONS = ("prefill", "decode")
DEFAULT_FUNCTION = "decode"
FORMAT_VERSION = 1


def weight_file_estimate(model: nn.Module) -> int:
    """Bytes the weight file will hold (upper estimate, before converting): fp16 for float tensors, the packed
    sizes of quantized linears, caches and states excluded. Tied tensors count once."""
    from pocketllm.export.nn.quant_linear import _Packed

    seen, total = set(), 0
    state_names = ("k_cache", "v_cache", "kc_cache", "state")
    for module in model.modules():
        packed = isinstance(module, _Packed) or hasattr(module, "qweight")
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if name in state_names or id(t) in seen:
                continue
            seen.add(id(t))
            if packed and name == "qweight":
                total += t.numel()  # bytes as packed: uint8 holds two 4-bit codes, int8 one code
            elif packed:
                total += t.numel() * 2
            elif t.is_floating_point():
                total += t.numel() * 2
    return total


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def check_fits(model: nn.Module, options: CoreMLOptions) -> int:
    estimate = weight_file_estimate(model)
    if estimate > options.max_weight_file_bytes:
        raise PocketllmError(f"--target coreml: the weights need about {size_text(estimate)} in the package's one "
                             f"weight file, over the {size_text(options.max_weight_file_bytes)} it may hold (the "
                             "Neural Engine refuses larger files; splitting is not supported): quantize (--quant "
                             "any4 or int4)")
    return estimate


@contextmanager
def quiet_coremltools():
    """coremltools' progress bars and INFO/WARNING chatter off (per-op warnings such as "Recklessly broadcast" or
    "cast to fp16 states" are expected here); errors still raise."""
    import logging
    from functools import partial

    logs = [logging.getLogger(name) for name in ("coremltools", "torchao")]  # incl. import-time notices
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    patched = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools.converters.mil.frontend.torch.ops as torch_ops
            import coremltools.converters.mil.mil.passes.pass_pipeline as pass_pipeline

            patched = [(torch_ops, "_tqdm", torch_ops._tqdm), (pass_pipeline, "tqdm", pass_pipeline.tqdm)]
            for m, a, bar in patched:
                setattr(m, a, partial(bar, disable=True))
            yield
    finally:
        for m, a, bar in patched:
            setattr(m, a, bar)
        for log, level in zip(logs, levels):
            log.setLevel(level)


def export_function(model: nn.Module, tokens: int) -> "torch.export.ExportedProgram":
    """torch.export of forward(tokens int32 [1, tokens], position int32 [1]), fixed shapes, ATen dialect."""
    example = (torch.zeros(1, tokens, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_check_is_size.*")
        ep = torch.export.export(model, example, strict=False)
        return ep.run_decompositions({})


def convert_function(ep, tokens: int, options: CoreMLOptions, path: Path):
    """ct.convert one exported program to a single-function package at `path`; states come from the mutated
    buffers (fp16)."""
    with quiet_coremltools():
        import coremltools as ct

        import pocketllm.export.targets.coreml.converters as converters  # registers the converters

    precision = ct.precision.FLOAT16 if options.compute_precision == "float16" else ct.precision.FLOAT32
    converters.BLOCK_DTYPE[0] = "fp16" if options.compute_precision == "float16" else "fp32"
    with quiet_coremltools():
        mlmodel = ct.convert(
            ep,
            inputs=[ct.TensorType(name="tokens", shape=(1, tokens), dtype=np.int32),
                    ct.TensorType(name="position", shape=(1,), dtype=np.int32)],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=precision,
            skip_model_load=True,
        )
    # coremltools 9 bug: MLModel.save of a torch.export conversion walks the program for ExecuTorch debug handles
    # and raises on any op with nested blocks (our MoE `cond`); the handles only feed an ExecuTorch debug file.
    mlmodel._mil_program = None
    mlmodel.save(str(path))
    del mlmodel


def save_multifunction(parts: dict[str, Path], out: Path) -> None:
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for function, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=function)
    desc.default_function_name = DEFAULT_FUNCTION
    with quiet_coremltools():
        ct.utils.save_multifunction(desc, str(out))


# ---------------------------------------------------------------------------------------------- read back
_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8"}


def _array_desc(feature) -> dict[str, Any]:
    t = feature.type.multiArrayType if feature.type.HasField("multiArrayType") else feature.type.stateType.arrayType
    return {"name": feature.name, "dtype": _DTYPES.get(t.dataType, str(t.dataType)), "shape": [int(d) for d in t.shape]}


def package_interface(package: Path) -> dict[str, Any]:
    """Functions, inputs, outputs and states exactly as the saved package declares them."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    functions = {}
    for f in spec.description.functions:
        functions[f.name] = {"inputs": [_array_desc(i) for i in f.input],
                             "outputs": [_array_desc(o) for o in f.output],
                             "states": [_array_desc(s) for s in f.state]}
    return {"functions": functions, "default_function": spec.description.defaultFunctionName,
            "specification_version": spec.specificationVersion}


def load_program(package: Path):
    """The saved package as a pymil Program (weights as numpy), for inspection and interpreters."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(package))
    return load(spec, ct.target.iOS18, file_weights_dir=str(Path(package).resolve() / WEIGHTS_REL))


def stored_weight_bits(program) -> dict[str, Any]:
    """Bits per weight as stored, over the quantized linears of one function: each constexpr op's inputs plus the
    fp16 group scales / zeros converters.py applies to its partial sums (their shapes follow from the op: LUT indices
    [G, N, g] -> scales [G, N] (+ zeros [G, N] unless the LUT is the one shared nf4 table); int4 data with scales
    [N, G] -> zeros [N, G]; per-row LUT [N, K] (any4 with one group per row) or int8: nothing beyond its inputs)."""
    from coremltools.converters.mil.mil import types

    def bits_of(var) -> int:
        width = types.builtin_to_string(var.dtype)
        per = {"uint4": 4, "int4": 4, "uint8": 8, "int8": 8, "fp16": 16, "fp32": 32, "int32": 32}[width]
        return int(np.prod(var.shape)) * per

    fn = program.functions[DEFAULT_FUNCTION]
    weights = bits = 0
    for op in fn.operations:
        if op.op_type == "constexpr_lut_to_dense" and op.indices.rank == 2:  # per-row LUT, nothing else
            bits += bits_of(op.indices) + bits_of(op.lut)
            weights += int(np.prod(op.indices.shape))
        elif op.op_type == "constexpr_lut_to_dense":
            G, N, g = op.indices.shape
            shared_lut = op.lut.shape[1] == 1
            bits += bits_of(op.indices) + bits_of(op.lut) + G * N * 16 * (1 if shared_lut else 2)
            weights += G * N * g
        elif op.op_type == "constexpr_blockwise_shift_scale":
            N, K = op.data.shape
            has_zeros = types.builtin_to_string(op.data.dtype) == "int4"
            bits += bits_of(op.data) + bits_of(op.scale) + (bits_of(op.scale) if has_zeros else 0)
            weights += N * K
    return {"quantized_weights": weights, "bits_per_weight": round(bits / weights, 4) if weights else None}


# ---------------------------------------------------------------------------------------------- export
def export_coreml(model: nn.Module, spec: ModelSpec, options: CoreMLOptions, out_dir: Path,
                  stage: Callable[[str], Any] | None = None) -> dict:
    """Write `out_dir/model.mlpackage`; returns the manifest's `targets.coreml` entry (manifest v2).

    `model` is a loaded CausalLM (quantized already for any4/int4/int8/nf4 by export/quant), swapped in place.
    Refuses (one line) a weight file over options.max_weight_file_bytes: before converting from an estimate, after
    from the file itself (the pipeline's atomic bundle directory then leaves nothing behind)."""
    stage = stage or (lambda name: nullcontext())
    if options.max_context != model.max_context:
        raise PocketllmError(f"Core ML options say --max-context {options.max_context} but the model was built "
                             f"with {model.max_context} cache rows")
    timings: dict[str, float] = {}
    estimate = check_fits(model, options)
    swaps = apply_swaps(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    chunk = options.chunk
    out_dir = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix=".coreml-", dir=out_dir))
    try:
        parts = {}
        for function, tokens in (("prefill", chunk), ("decode", 1)):
            with stage(f"export {function}"):
                t0 = time.perf_counter()
                ep = export_function(model, tokens)
                timings[f"export_{function}_s"] = time.perf_counter() - t0
            with stage(f"convert {function}"):
                t0 = time.perf_counter()
                parts[function] = work / f"{function}.mlpackage"
                convert_function(ep, tokens, options, parts[function])
                del ep
                timings[f"convert_{function}_s"] = time.perf_counter() - t0
        with stage("multifunction"):
            t0 = time.perf_counter()
            package = work / PACKAGE
            save_multifunction(parts, package)
            timings["multifunction_s"] = time.perf_counter() - t0
        weight_bytes = sum(f.stat().st_size for f in (package / WEIGHTS_REL).glob("*"))
        if weight_bytes > options.max_weight_file_bytes:
            raise PocketllmError(f"--target coreml: the weight file is {size_text(weight_bytes)}, over the "
                                 f"{size_text(options.max_weight_file_bytes)} a package may hold (splitting is not "
                                 "supported): quantize (--quant any4 or int4)")
        interface = package_interface(package)
        stored = stored_weight_bits(load_program(package))
        shutil.move(str(package), str(out_dir / PACKAGE))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest_entry(spec, options, interface, stored, weight_bytes, estimate, swaps, timings)


ROLES = {"tokens": "tokens", "position": "position", "logits": "logits"}


def manifest_entry(spec: ModelSpec, options: CoreMLOptions, interface: dict, stored: dict, weight_bytes: int,
                   estimate: int, swaps: dict, timings: dict) -> dict[str, Any]:
    """The manifest's `targets.coreml` (schema: export/bundle/manifest.schema.json `coreml_target`). Function,
    input, output and state names, shapes and dtypes are read back from the saved package."""
    functions, states = {}, None
    for name in FUNCTIONS:
        f = interface["functions"][name]
        functions[name] = {"name": name,
                           "inputs": [dict(d, role=ROLES[d["name"]]) for d in f["inputs"]],
                           "outputs": [dict(d, role=ROLES[d["name"]]) for d in f["outputs"]]}
        if states is None:
            states = f["states"]
        elif f["states"] != states:
            raise PocketllmError("Core ML: the prefill and decode functions declare different states")
    quant = {"scheme": options.quant, "stored_bits_per_weight": stored["bits_per_weight"],
             "stored_quantized_weights": stored["quantized_weights"], "embedding": "fp16", "lm_head": "fp16"}
    return {
        "file": PACKAGE,
        "format_version": FORMAT_VERSION,
        "deployment_target": options.deployment_target,
        "compute_precision": options.compute_precision,
        # floating-point weights as stored: parity runs the reference on the bundle's weights rounded to this
        "float_weights": options.compute_precision,
        "functions": functions,
        "default_function": interface["default_function"],
        "states": states,
        "prefill_chunk": options.chunk,
        "pad_token_id": PAD_TOKEN_ID,
        # a lightning (recurrent) state cannot tell padding from tokens: such packages are prefilled in full chunks
        # only, the rest of a prompt through decode
        "pads_prefill": swaps["lightning"] == 0,
        "rewinds": swaps["lightning"] == 0,
        "requires_kernels": [],
        "weights_bytes": weight_bytes,
        "weights_estimate_bytes": estimate,
        "infllm_score_rule": spec.sparse.score_rule if swaps["infllm"] else None,
        "swaps": swaps,
        "quantization": quant,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
