"""The ONNX lowering: swapped torch model -> `torch.onnx.export` (dynamo) -> checked graph -> files.

Graph I/O follows onnxruntime-genai's decoder conventions (what its model builder writes), batch 1:

    input_ids                        int64 [1, sequence_length]
    attention_mask                   int64 [1, total_sequence_length]   (1 = attend; key padding mask)
    past_key_values.{i}.key / value  fp32  [1, Hkv, past_sequence_length, D]     softmax layers i
    past.{i}.recurrent               fp32  [1, H, D, D]                           lightning layers i
 -> logits                           fp32  [1, sequence_length, vocab]
    present.{i}.key / value          fp32  [1, Hkv, total_sequence_length, D]
    present.{i}.recurrent            fp32  [1, H, D, D]

    past.{i}.conv / present.{i}.conv fp32  [1, 1, 1]   lightning layers i: a placeholder passed through unchanged.
                                     onnxruntime-genai 0.18 manages recurrent states only in pairs with a causal-conv
                                     state (its Qwen3.5 / LFM2 gated-delta-net layers); lightning has no conv, so the
                                     graph carries this one-element tensor to satisfy genai.

Positions are `past_sequence_length + arange(sequence_length)` (from the attention mask's length when the model has
no KV layer), so there is no position_ids input. The KV cache grows by concatenation (genai's
past_present_share_buffer = false): a fixed-size shared buffer would need an in-place scatter that standard ops
cannot express without copying the whole cache anyway.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pocketllm.export.errors import PocketllmError
from pocketllm.export.spec import ModelSpec
from pocketllm.export.targets.onnx.contrib import CODES_DOMAIN, translation_table
from pocketllm.export.targets.onnx.decompose import lightning_attention
from pocketllm.export.targets.onnx.options import OnnxOptions
from pocketllm.export.targets.onnx.swaps import CallInputs, SwapReport, apply_swaps

ONNX_DIR = "onnx"  # the target's folder inside a bundle
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROTOBUF_LIMIT = 2 * 1024**3  # bytes; a ModelProto cannot be serialised above this
FORMAT_VERSION = 1  # of the I/O contract above


def kv_names(i: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


def state_names(i: int) -> tuple[str, str]:
    return f"past.{i}.recurrent", f"present.{i}.recurrent"


def conv_names(i: int) -> tuple[str, str]:
    return f"past.{i}.conv", f"present.{i}.conv"


CONV_PLACEHOLDER = [1, 1, 1]  # genai 0.18 pairs every recurrent state with a causal-conv state (see module doc)


class GenaiGraph(nn.Module):
    """forward(input_ids, attention_mask, *pasts) -> (logits, *presents), genai's I/O around the swapped model."""

    def __init__(self, model: nn.Module, report: SwapReport, inputs: CallInputs):
        super().__init__()
        self.model, self.report, self.inputs = model, report, inputs
        layers = model.model.layers
        self.caches = [layers[i].self_attn.cache for i in report.kv_layers]
        self.states = [layers[i].self_attn.state_cache for i in report.state_layers]

    def forward(self, input_ids, attention_mask, *pasts):
        n = len(self.caches)
        for j, cache in enumerate(self.caches):
            cache.past = (pasts[2 * j], pasts[2 * j + 1])
        for j, state in enumerate(self.states):
            state.past = pasts[2 * n + 2 * j]
        convs = [pasts[2 * n + 2 * j + 1] for j in range(len(self.states))]
        T = input_ids.shape[1]
        start = pasts[0].shape[2] if n else attention_mask.shape[1] - T
        self.inputs.key_mask = attention_mask[0] != 0
        logits = self.model(input_ids, start)
        outs = [logits]
        for cache in self.caches:
            outs.extend(cache.present)
        for state, conv in zip(self.states, convs):
            outs += [state.present, conv.clone()]
        return tuple(outs)

    def io_names(self) -> tuple[list[str], list[str]]:
        ins, outs = ["input_ids", "attention_mask"], ["logits"]
        for i in self.report.kv_layers:
            pk, pv, k, v = kv_names(i)
            ins += [pk, pv]
            outs += [k, v]
        for i in self.report.state_layers:
            (p, s), (pc, c) = state_names(i), conv_names(i)
            ins += [p, pc]
            outs += [s, c]
        return ins, outs

    def example(self, spec: ModelSpec, T: int = 7, P: int = 193):
        """Example inputs and torch.export dynamic shapes. Sizes are only traced, never run: they are chosen so
        that no derived size is 0 or 1 (torch.export would specialise it), e.g. InfLLM's kernel and block counts
        over P + T = 200 keys (13 kernels of 32/16, 4 coarse kernels of 128/64, 4 blocks of 64)."""
        from torch.export import Dim

        seq = Dim("sequence_length", min=1)
        past = Dim("past_sequence_length", min=0)
        args = [torch.zeros(1, T, dtype=torch.long), torch.ones(1, P + T, dtype=torch.long)]
        past_shapes: list[Any] = []  # forward's *pasts is one argument for torch.export
        for _ in self.report.kv_layers:
            for _ in range(2):
                args.append(torch.zeros(1, spec.num_kv_heads, P, spec.head_dim))
                past_shapes.append({2: past})
        for _ in self.report.state_layers:
            args += [torch.zeros(1, spec.num_heads, spec.head_dim, spec.head_dim), torch.zeros(CONV_PLACEHOLDER)]
            past_shapes += [None, None]
        return tuple(args), ({1: seq}, {1: Dim.AUTO}, tuple(past_shapes))


def io_spec(report: SwapReport, spec: ModelSpec) -> tuple[list[dict], list[dict]]:
    """The manifest's inputs / outputs (names, dtypes, shapes with symbolic dims)."""
    kv_shape = [1, spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    st_shape = [1, spec.num_heads, spec.head_dim, spec.head_dim]
    ins = [{"name": "input_ids", "dtype": "int64", "shape": [1, "sequence_length"]},
           {"name": "attention_mask", "dtype": "int64", "shape": [1, "total_sequence_length"]}]
    outs = [{"name": "logits", "dtype": "float32", "shape": [1, "sequence_length", spec.vocab_size]}]
    for i in report.kv_layers:
        pk, pv, k, v = kv_names(i)
        ins += [{"name": n, "dtype": "float32", "shape": kv_shape} for n in (pk, pv)]
        outs += [{"name": n, "dtype": "float32", "shape": [*kv_shape[:2], "total_sequence_length", kv_shape[3]]}
                 for n in (k, v)]
    for i in report.state_layers:
        (p, s), (pc, c) = state_names(i), conv_names(i)
        ins += [{"name": p, "dtype": "float32", "shape": st_shape},
                {"name": pc, "dtype": "float32", "shape": CONV_PLACEHOLDER, "role": "genai placeholder, unused"}]
        outs += [{"name": s, "dtype": "float32", "shape": st_shape},
                 {"name": c, "dtype": "float32", "shape": CONV_PLACEHOLDER, "role": "genai placeholder, unused"}]
    return ins, outs


def _lightning_decomposition(q, k, v, state, decay, block_size):
    return lightning_attention(q, k, v, state, decay)


def export_program(graph: GenaiGraph, spec: ModelSpec, options: OnnxOptions):
    """torch.onnx.export (dynamo) of the wrapper -> ONNXProgram. With lightning layers, torch.export first and
    pocketllm::lightning_attention (left in the model by the swaps: its module calls the op) decomposed into
    standard torch ops by run_decompositions."""
    import pocketllm.export.ops  # noqa: F401  (the pocketllm op library)

    args, shapes = graph.example(spec)
    ins, outs = graph.io_names()
    # "torchvision is not installed. Skipping torchvision::nms" x4 (torch's logging config resets earlier levels)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        try:
            model: Any = graph
            export_shapes: Any = shapes
            if graph.report.state_layers:  # decompose pocketllm::lightning_attention before the ONNX translation
                model = torch.export.export(graph, args, dynamic_shapes=shapes, strict=False).run_decompositions(
                    {torch.ops.pocketllm.lightning_attention.default: _lightning_decomposition})
                export_shapes = None  # the ExportedProgram carries them
            # (no lightning: the module itself; re-exporting an ExportedProgram whose InfLLM dense fallback is a
            # torch.cond fails in the ONNX exporter with "FunctionalTensor on its own")
            program = torch.onnx.export(model, args, dynamo=True, input_names=ins, output_names=outs,
                                        dynamic_shapes=export_shapes, opset_version=options.opset, optimize=False,
                                        custom_translation_table=translation_table(), verbose=False)
        except PocketllmError:
            raise
        except Exception as e:  # the exporter raises many types; one line: its exception summary's first line
            raise PocketllmError(f"torch.onnx.export failed: {_summary(e)}") from e
    rewrite_markers(program.model)
    optimize(program.model)
    name_total_length(program.model)
    return program


def rewrite_markers(model) -> None:
    """Codes4(packed, one) -> Cast(DequantizeLinear(packed viewed as UINT4 [N, K], one), int32) (ops.py)."""
    import onnx_ir as ir

    graph = model.graph
    for node in [n for n in graph if n.domain == CODES_DOMAIN]:
        packed, one = node.inputs
        data = packed.const_value.numpy()  # uint8 [N, K/2], low nibble = even column (= ONNX's UINT4 packing)
        codes4 = ir.Value(name=f"{packed.name}.uint4", type=ir.TensorType(ir.DataType.UINT4),
                          shape=ir.Shape([data.shape[0], 2 * data.shape[1]]),
                          const_value=ir.PackedTensor(data, ir.DataType.UINT4, shape=[data.shape[0], 2 * data.shape[1]]))
        graph.register_initializer(codes4)
        dq = ir.node("DequantizeLinear", inputs=[codes4, one])
        cast = ir.node("Cast", inputs=[dq.outputs[0]], attributes={"to": ir.DataType.INT32})
        graph.insert_before(node, [dq, cast])
        ir.convenience.replace_all_uses_with(node.outputs[0], cast.outputs[0])
        graph.remove(node, safe=True)
        if not packed.uses() and packed.name in graph.initializers:
            graph.initializers.pop(packed.name)
    model.opset_imports.pop(CODES_DOMAIN, None)


def _summary(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("<class")]
    return (causes[0] if causes else lines[0] if lines else type(e).__name__)[:300]


def name_total_length(model) -> None:
    """Give the key length genai's name: attention_mask and present.* say total_sequence_length (torch.export
    calls it s<N> or `past_sequence_length + sequence_length`)."""
    import onnx_ir as ir

    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None or not (value.name == "attention_mask" or value.name.startswith("present.")):
            continue
        dims = [ir.SymbolicDim("total_sequence_length") if isinstance(d, ir.SymbolicDim) and d.value
                and d.value not in ("sequence_length", "past_sequence_length") else d for d in value.shape]
        value.shape = ir.Shape(dims)


def optimize(model) -> None:
    """onnxscript's optimizer without its pattern rewriter (which took 150 of 250 s on an 8-layer model and whose
    fusions ORT applies itself at session start): constant folding of small tensors (weights are never folded:
    input/output size limits), dead-node removal, constants lifted to initializers, duplicate initializers and
    common subexpressions merged."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                                   output_size_limit=8192),
                               common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def initializer_bytes(model_proto) -> int:
    total = 0
    for t in model_proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * _ELEMENT_BYTES.get(t.data_type, 4)
    return total


_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}


def save_model(program, out_dir: Path, options: OnnxOptions) -> dict[str, Any]:
    """Write out_dir/model.onnx (+ model.onnx.data). Decides external data from the weight bytes; "never" above the
    protobuf limit is a one-line error before anything is written."""
    model_ir = program.model
    weight_bytes = sum(v.const_value.nbytes for v in model_ir.graph.initializers.values()
                       if v.const_value is not None)
    external = {"always": True, "never": False}.get(options.external_data,
                                                     weight_bytes > options.external_data_threshold_mib * 2**20)
    if not external and weight_bytes >= PROTOBUF_LIMIT:
        raise PocketllmError(f"onnx: the weights take {weight_bytes / 2**30:.2f} GiB, over protobuf's 2 GiB limit for "
                             "one model.onnx; use external_data 'auto' or 'always' (writes model.onnx.data)")
    path = out_dir / MODEL_FILE
    if external:
        program.save(str(path), external_data=True)
        written = out_dir / (MODEL_FILE + ".data")
        if written.exists() and written.name != DATA_FILE:
            os.replace(written, out_dir / DATA_FILE)
    else:
        program.save(str(path), external_data=False)
    return {"external_data": DATA_FILE if external else None, "weight_bytes": weight_bytes}


def graph_summary(path: Path) -> dict[str, Any]:
    """Operator set and domains of the written model (no weights loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops_used = sorted({(n.domain or "ai.onnx") + "::" + n.op_type for n in proto.graph.node})
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"operators": ops_used, "opsets": opsets, "nodes": len(proto.graph.node)}


def export_onnx(model: nn.Module, spec: ModelSpec, options: OnnxOptions, out_dir: Path,
                stage: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Swap, export and write `out_dir/onnx/` (model.onnx (+ data), genai_config.json). Returns the manifest's
    `targets.onnx` entry (paths relative to the bundle directory out_dir)."""
    from contextlib import nullcontext

    from pocketllm.export.targets.onnx.genai_config import CONFIG_FILE, genai_config, write_genai_config

    stage = stage or (lambda name: nullcontext())
    folder = Path(out_dir) / ONNX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report, inputs = apply_swaps(model, spec, options)
    graph = GenaiGraph(model, report, inputs).eval()
    with stage("export"):
        t0 = time.perf_counter()
        program = export_program(graph, spec, options)
        timings["export_s"] = time.perf_counter() - t0
    with stage("serialize"):
        t0 = time.perf_counter()
        saved = save_model(program, folder, options)
        del program
        timings["serialize_s"] = time.perf_counter() - t0
    summary = graph_summary(folder / MODEL_FILE)
    ins, outs = io_spec(report, spec)
    config = genai_config(spec, options, report)
    write_genai_config(folder, config)
    return {
        "dir": ONNX_DIR,
        "file": f"{ONNX_DIR}/{MODEL_FILE}",
        "format_version": FORMAT_VERSION,
        "external_data": f"{ONNX_DIR}/{DATA_FILE}" if saved["external_data"] else None,
        "genai_config": f"{ONNX_DIR}/{CONFIG_FILE}",
        "inputs": ins,
        "outputs": outs,
        "kv_layers": report.kv_layers,
        "state_layers": report.state_layers,
        "moe_layers_routed": report.moe_layers,
        "linears": report.linears,
        "any4_form": options.any4_form if any(k.startswith("any4") for k in report.linears) else None,
        "requires_kernels": [],
        "session_options": config["model"]["decoder"]["session_options"],
        "past_present_share_buffer": False,
        "prefill_chunk": options.chunk or options.max_context,
        "opset": summary["opsets"],
        "operators": summary["operators"],
        "nodes": summary["nodes"],
        "weight_bytes": saved["weight_bytes"],
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
