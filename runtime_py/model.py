"""Load the numpy reference model of a checkpoint: the one place runtime_py reads export/'s spec reader.

`ReferenceModel.from_checkpoint(dir)` validates the checkpoint with export.checkpoint (config -> ModelSpec, tensor
names and shapes), reads its weights as float32 (runtime_py/weights.py; packed quantized tensors dequantized by
runtime_py/quant.py) and builds the family's model (runtime_py/families/<family>.py). The model math itself is
written from MODELS.md and shares no code with export/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pocketllm.runtime_py.families import model_class


class ReferenceModel:
    """Factory: `ReferenceModel(spec, weights, max_context)` and `.from_checkpoint(dir)` return the family's model
    (engine protocol: forward(tokens int [T], start_pos) -> logits float32 [T, vocab]; reset())."""

    def __new__(cls, spec, weights, max_context: int | None = None):
        """max_context None: export's default cache size for this model (export/defaults.py)."""
        if max_context is None:
            from pocketllm.export.defaults import resolve_max_context

            max_context = resolve_max_context(spec, None)
        return model_class(spec.family)(spec, weights, max_context=max_context)

    @classmethod
    def from_checkpoint(cls, path: str | Path, max_context: int | None = None, score_rule: str | None = None,
                        float_weights: str | None = None, activations: str = "fp32",
                        activation_jitter: float = 0.0, kv_cache_dtype: str = "float32"):
        """Validate a HF-style checkpoint directory (export.checkpoint) and load its weights as float32.

        score_rule: the InfLLM v2 score rule to run with ("upstream" | "exact"), for a bundle exported with
        `--infllm-scores`: it is an export option recorded in the manifest (attention.infllm_v2.score_rule), never a
        config.json key, so whoever reads the manifest passes it (runtime_py/parity.py). None: the spec's (upstream).

        float_weights "float16": the weights an fp16 artifact (a Core ML package) holds: every floating-point
        tensor rounded to fp16; packed quantized weights stay exactly as dequantized (the artifact dequantizes
        them itself), except any4 with one group per row, whose table folds scale and zero and is stored in fp16.

        activations "int8": the decoder's any4 layers run with W4A8 numerics (a W4A8 bundle's contract);
        activation_jitter eps > 0 moves each of their inputs by a relative eps * N(0, 1) before int8 rounding (the
        noise floor W4A8 parity measures, runtime_py/parity.py).

        kv_cache_dtype "float16": keys and values rounded to fp16 as they are cached (an artifact with an fp16 KV
        cache, ExecuTorch's kv_cache_dtype; runtime_py/decoder.py KVCaches).
        """
        from pocketllm.export.checkpoint import open_checkpoint
        from pocketllm.runtime_py.decoder import KVCaches
        from pocketllm.runtime_py.errors import PocketllmError
        from pocketllm.runtime_py.weights import load_weights

        if kv_cache_dtype not in KVCaches.DTYPES:
            raise PocketllmError(f"KV cache dtype {kv_cache_dtype!r}: expected one of {', '.join(KVCaches.DTYPES)}")
        ckpt = open_checkpoint(path)
        spec = ckpt.spec
        if score_rule is not None and spec.sparse is not None:
            spec = replace(spec, sparse=replace(spec.sparse, score_rule=score_rule))
        if ckpt.quantization is not None:  # packed 4/8-bit weights, dequantized by runtime_py/quant.py
            from pocketllm.runtime_py.quant import quantized_weight_loader

            load_weights = quantized_weight_loader(ckpt.quantization, activations, activation_jitter)  # noqa: F811
        elif activations != "fp32":
            raise PocketllmError(f"{path}: activations {activations!r} need a quantized (any4) checkpoint")
        weights = load_weights(ckpt.dir, ckpt.weight_map)
        if float_weights == "float16":
            weights = round_to_fp16(weights, ckpt.quantization)
        elif float_weights not in (None, "float32"):
            raise ValueError(f"float_weights must be None, 'float32' or 'float16' (got {float_weights!r})")
        model = cls(spec, weights, max_context=max_context)
        if kv_cache_dtype != "float32":
            if not isinstance(getattr(model, "caches", None), KVCaches):
                raise PocketllmError(f"{path}: a {kv_cache_dtype} KV cache is not modelled for {spec.family}")
            model.caches.dtype = kv_cache_dtype  # checked against KVCaches.DTYPES before the weights were read
        return model


def round_to_fp16(weights: dict, quantization=None) -> dict:
    """Weights as an fp16 artifact stores them (see ReferenceModel.from_checkpoint's float_weights)."""
    import numpy as np

    exact = set()
    for module, tq in (quantization.modules.items() if quantization is not None else ()):
        w = weights.get(f"{module}.weight")
        per_row_any4 = tq.scheme == "any4" and w is not None and tq.group_size in (0, w.shape[-1])
        if not per_row_any4:
            exact.add(f"{module}.weight")
    return {name: w if name in exact else w.astype(np.float16).astype(np.float32) for name, w in weights.items()}
