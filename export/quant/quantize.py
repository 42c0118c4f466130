"""`quantize_checkpoint`: read a checkpoint, calibrate, quantize, and write a quantized checkpoint, layer by layer.

Memory: the model is built on the meta device and only one decoder layer at a time gets real (fp32) weights,
read from the checkpoint's memory-mapped shards. The calibration hidden states of that layer are run through it
(cache-free causal path, as in training) while forward pre-hooks on its Linear modules collect input statistics;
then its weights are quantized tensor by tensor and handed to the shard writer, which flushes a shard whenever
SHARD_BYTES have accumulated; freed heap pages are handed back to the OS after every layer. Peak memory is about
one layer in fp32, the embedding table and one output shard: 1.27 GiB peak RSS for the bf16 0.5b preset.

The recipe (recipe.py) decides what is quantized; the scheme files decide how; the per-tensor error of every
quantized tensor is measured on the model's own dequantization (export/nn/quant_linear.py) and reported.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from pocketllm.export.checkpoint import CONFIG, Checkpoint, expected_tensors, open_checkpoint
from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import get_family
from pocketllm.export.atomic import atomic_directory
from pocketllm.export.outputs import check_out_dir
from pocketllm.export.checkpoint_writer import write_weights
from pocketllm.export.quant import any4, int4, int8, nf4
from pocketllm.export.quant.calibrate import DEFAULT_ACT_STAT, ACT_STATS, ActivationStats, calibration_text, calibration_windows
from pocketllm.export.quant.format import REPORT_FILE, QuantConfig, TensorQuant  # noqa: F401  (REPORT_FILE re-exported)
from pocketllm.export.quant.recipe import Recipe, default_recipe

SHARD_BYTES = 256 * 1024**2
CALIBRATION_WINDOW = 512
MAX_CALIBRATION_TOKENS = 2048
_DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2}


@dataclass
class TensorReport:
    name: str  # module name (the weight was `name.weight`)
    scheme: str
    group_size: int
    shape: tuple[int, int]
    bits_per_weight: float
    rel_error: float  # ||W - Wq||_F / ||W||_F
    weighted_rel_error: float  # the same with columns weighted by their calibration RMS input (output-error proxy)
    max_abs_error: float
    seconds: float


@dataclass
class QuantizeResult:
    out: Path
    config: QuantConfig
    tensors: list[TensorReport] = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        sq = sum(t.rel_error ** 2 * t.shape[0] * t.shape[1] for t in self.tensors)
        n = sum(t.shape[0] * t.shape[1] for t in self.tensors)
        return {"scheme": self.config.scheme, "group_size": self.config.group_size,
                "quantized_tensors": len(self.tensors), "quantized_weights": n,
                "bits_per_weight": self.config.bits_per_weight(),
                "mean_rel_error": sum(t.rel_error for t in self.tensors) / max(len(self.tensors), 1),
                "max_rel_error": max((t.rel_error for t in self.tensors), default=0.0),
                "rms_rel_error": (sq / n) ** 0.5 if n else 0.0,
                "mean_weighted_rel_error": sum(t.weighted_rel_error for t in self.tensors) / max(len(self.tensors), 1),
                "calibration_tokens": self.calibration_tokens, "seconds": self.seconds}


def quantize_tensor(w: torch.Tensor, quant: TensorQuant, col_weight: torch.Tensor | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """One Linear weight [N, K] (any float dtype) -> its packed tensors (suffix -> tensor)."""
    w = w.to(torch.float32)
    g = quant.group(w.shape[1])
    if quant.scheme == "any4":
        return any4.quantize(w, g, col_weight, seed=seed)
    if quant.scheme == "int4":
        return int4.quantize(w, g)
    if quant.scheme == "nf4":
        return nf4.quantize(w, g)
    if quant.scheme == "int8":
        return int8.quantize(w)
    raise PocketllmError(f"unknown quantization scheme {quant.scheme!r}")


def quantize_checkpoint(checkpoint: str | Path | Checkpoint, out: str | Path, scheme: str,
                        group_size: int | None = None, calibration: str | None = None,
                        quantize_lm_head: bool = False, force: bool = False, seed: int = 0,
                        max_calibration_tokens: int = MAX_CALIBRATION_TOKENS, act_stat: str = DEFAULT_ACT_STAT,
                        recipe: Recipe | None = None,
                        progress: Callable[[int, int, str], None] | None = None) -> QuantizeResult:
    """Quantize `checkpoint` into a new checkpoint directory `out` (written atomically; nothing on failure).

    progress(done, total, what) is called as layers finish (total = layers + 2: embeddings, head).
    """
    t_start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    spec = ckpt.spec
    calibration_file = Path(calibration) if calibration and Path(calibration).is_file() else None
    check_out_dir(Path(out), force=force, inputs={"--checkpoint": ckpt.dir, "--calibration": calibration_file})
    if ckpt.quantization is not None:
        raise PocketllmError(f"{ckpt.dir}: checkpoint is already quantized (scheme {ckpt.quantization.scheme}); "
                             "quantize the original floating-point checkpoint instead")
    if act_stat not in ACT_STATS:
        raise PocketllmError(f"unknown activation statistic {act_stat!r} (expected one of: {', '.join(ACT_STATS)})")
    if quantize_lm_head and spec.tie_word_embeddings:
        raise PocketllmError("--quantize-lm-head: this model ties lm_head to model.embed_tokens "
                             "(tie_word_embeddings), and the embedding table stays in floating point")
    recipe = recipe or default_recipe(scheme, group_size, quantize_lm_head, get_family(spec.family).float_modules)
    expected = expected_tensors(spec)
    plan = recipe.plan(expected, "--group-size")
    if not plan:
        raise PocketllmError(f"{ckpt.dir}: the recipe quantizes no tensor of this {spec.family} checkpoint")
    text, source = calibration_text(calibration)

    from pocketllm.export.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt.dir, spec.bos_token_id)
    window = min(CALIBRATION_WINDOW, spec.max_position_embeddings)
    windows = calibration_windows(tok.encode(text), spec.bos_token_id, window, max_calibration_tokens)
    n_tokens = sum(len(w) for w in windows)

    shapes = {m: tuple(expected[m + ".weight"]) for m in plan}
    weights_per_quant: dict[TensorQuant, int] = {}
    for m, q in plan.items():
        weights_per_quant[q] = weights_per_quant.get(q, 0) + shapes[m][0] * shapes[m][1]
    headline = max(weights_per_quant, key=weights_per_quant.get)  # the scheme most weights use
    config = QuantConfig(
        scheme=headline.scheme, group_size=headline.group_size, modules=plan, shapes=shapes,
        calibration={"source": source, "tokens": n_tokens, "statistic": act_stat, "seed": seed})
    result = QuantizeResult(out=Path(out), config=config, calibration_tokens=n_tokens)

    with atomic_directory(Path(out), force=force) as tmp:
        cfg = dict(ckpt.config)
        cfg["quantization_config"] = config.to_dict()
        tensors = _quantized_stream(ckpt, plan, windows, window, act_stat, seed, result, progress)
        write_weights(tmp, tensors, shard_bytes=SHARD_BYTES, total_bytes=_output_bytes(ckpt, config))
        for f in ckpt.tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        result.seconds = time.perf_counter() - t_start
        report = {"summary": result.summary(), "tensors": [asdict(t) for t in result.tensors]}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return result


def _output_bytes(ckpt: Checkpoint, config: QuantConfig) -> int:
    total = 0
    for name in ckpt.weight_map:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module in config.modules:
            for dt, shape in config.modules[module].packed(*config.shapes[module]).values():
                n = 1
                for s in shape:
                    n *= s
                total += n * _DTYPE_BYTES[dt]
        else:
            n = 1
            for s in ckpt.shapes[name]:
                n *= s
            total += n * (4 if ckpt.dtypes[name] == "F32" else 2)
    return total


def _materialize(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Give a meta-device submodule real fp32 storage and the checkpoint's weights (names under `prefix`)."""
    module.to_empty(device="cpu")
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):  # buffers that are functions of the spec (lightning decay rates)
            sub.reset_buffers()
    wanted = set(module.state_dict())
    state = {n[len(prefix):]: t.to(torch.float32) for n, t in tensors.items() if n[len(prefix):] in wanted}
    module.load_state_dict(state, strict=True, assign=True)


@torch.no_grad()
def _quantized_stream(ckpt: Checkpoint, plan: dict[str, TensorQuant], windows: list[list[int]], window: int,
                      act_stat: str, seed: int, result: QuantizeResult,
                      progress) -> Iterator[tuple[str, torch.Tensor]]:
    from pocketllm.export.nn.decoder import CausalLM

    spec = ckpt.spec
    total_steps = spec.num_layers + 2
    with torch.device("meta"):
        model = CausalLM(spec, window)
    rotary = model.model.rotary.to_empty(device="cpu")
    rotary.reset_tables()
    stats = ActivationStats()
    names = list(ckpt.weight_map)
    layer_names = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(spec.num_layers)]
    in_layers = {n for group in layer_names for n in group}
    head_names = [n for n in names if n not in in_layers and n != "model.embed_tokens.weight"]

    # embeddings: copied as stored; the calibration hidden states start here
    (_, embed), = ckpt.iter_tensors(names=["model.embed_tokens.weight"])
    hidden = [embed[torch.tensor(w)].to(torch.float32)[None] * spec.scale_emb for w in windows]
    yield "model.embed_tokens.weight", embed
    del embed
    if progress:
        progress(1, total_steps, "embeddings")

    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        tensors = dict(ckpt.iter_tensors(names=layer_names[i]))
        layer = model.model.layers[i]
        _materialize(layer, tensors, prefix)
        hooks = [layer.get_submodule(m[len(prefix):]).register_forward_pre_hook(stats.hook(m))
                 for m in plan if m.startswith(prefix)]
        hidden = [layer(h, rotary, torch.arange(h.shape[1]), None) for h in hidden]
        for h in hooks:
            h.remove()
        layer.to_empty(device="meta")  # free this layer's fp32 copy
        yield from _emit(tensors, plan, stats, act_stat, seed, result)
        del tensors
        _release_freed_memory()
        if progress:
            progress(i + 2, total_steps, f"layer {i + 1}/{spec.num_layers}")

    # final norm and (untied) lm_head; the head's input is norm(h) * logit_scale
    tensors = dict(ckpt.iter_tensors(names=head_names))
    if "lm_head" in plan:
        norm = model.model.norm
        _materialize(norm, {k: v for k, v in tensors.items() if k == "model.norm.weight"}, "model.norm.")
        for h in hidden:
            stats.get("lm_head").add(norm(h) * spec.logit_scale)
    yield from _emit(tensors, plan, stats, act_stat, seed, result)
    if progress:
        progress(total_steps, total_steps, "head")


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). The packed outputs that wait for their shard are small and
    long-lived, interleaved with each layer's large short-lived temporaries: without this the heap fragments and
    peak RSS on the 0.5b preset was 2.2 GiB instead of 1.2 GiB. A no-op without glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (raises AttributeError when absent)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _emit(tensors: dict[str, torch.Tensor], plan: dict[str, TensorQuant], stats: ActivationStats, act_stat: str,
          seed: int, result: QuantizeResult) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield each tensor as stored, or, for planned weights, its packed tensors (and record the error).

    any4 weights of one layer that share input width and group size are clustered in one call (rows are
    independent: each keeps its own LUT, groups and calibration weights), so small matrices such as MoE experts
    cost one batched k-means instead of one each.
    """
    from pocketllm.export.nn.quant_linear import dequantize_packed

    weights = {n[:-len(".weight")]: t.to(torch.float32) for n, t in tensors.items()
               if n.endswith(".weight") and n[:-len(".weight")] in plan}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    batches: dict[tuple[int, int], list[str]] = {}
    for module, w in weights.items():
        quant = plan[module]
        if quant.scheme == "any4":
            batches.setdefault((w.shape[1], quant.group(w.shape[1])), []).append(module)
        else:
            t0 = time.perf_counter()
            packed[module] = quantize_tensor(w, quant)
            seconds[module] = time.perf_counter() - t0
    for (K, g), modules in batches.items():
        t0 = time.perf_counter()
        cols = []
        for m in modules:
            c = stats.get(m).column_weight(act_stat)
            cols.append((torch.ones(K) if c is None else c).expand(weights[m].shape[0], K))
        out = any4.quantize(torch.cat([weights[m] for m in modules]), g, torch.cat(cols), seed=seed)
        elapsed, total_rows, r0 = time.perf_counter() - t0, sum(weights[m].shape[0] for m in modules), 0
        for m in modules:
            r1 = r0 + weights[m].shape[0]
            packed[m] = {k: v[r0:r1].clone() for k, v in out.items()}
            seconds[m] = elapsed * (r1 - r0) / total_rows
            r0 = r1

    for name in sorted(tensors):
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module not in plan:
            yield name, tensors[name]
            continue
        quant, w = plan[module], weights.pop(module)
        N, K = w.shape
        err = dequantize_packed(quant, packed[module], K) - w
        rms = stats.get(module).column_weight("rms")
        r = rms if rms is not None and bool((rms > 0).any()) else torch.ones(K)
        result.tensors.append(TensorReport(
            name=module, scheme=quant.scheme, group_size=quant.group_size, shape=(N, K),
            bits_per_weight=quant.bits_per_weight(N, K),
            rel_error=float(err.norm() / w.norm().clamp(min=1e-30)),
            weighted_rel_error=float((err * r).norm() / (w * r).norm().clamp(min=1e-30)),
            max_abs_error=float(err.abs().max()), seconds=seconds[module]))
        del err, w
        for suffix, t in packed.pop(module).items():
            yield f"{module}.{suffix}", t
