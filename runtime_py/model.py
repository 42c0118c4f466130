"""Load the numpy reference model of a checkpoint: the one place runtime_py reads export/'s spec reader.

`ReferenceModel.from_checkpoint(dir)` validates the checkpoint with export.checkpoint (config -> ModelSpec, tensor
names and shapes), reads its weights as float32 (runtime_py/weights.py; packed quantized tensors dequantized by
runtime_py/quant.py) and builds the family's model (runtime_py/families/<family>.py). The model math itself is
written from MODELS.md and shares no code with export/.
"""

from __future__ import annotations

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
    def from_checkpoint(cls, path: str | Path, max_context: int | None = None, activations: str = "fp32"):
        """Validate a HF-style checkpoint directory (export.checkpoint) and load its weights as float32.
        activations "int8": the decoder's any4 layers run with W4A8 numerics (a W4A8 bundle's contract)."""
        from pocketllm.export.checkpoint import open_checkpoint
        from pocketllm.runtime_py.errors import PocketllmError
        from pocketllm.runtime_py.weights import load_weights

        ckpt = open_checkpoint(path)
        if ckpt.quantization is not None:  # packed 4/8-bit weights, dequantized by runtime_py/quant.py
            from pocketllm.runtime_py.quant import quantized_weight_loader

            load_weights = quantized_weight_loader(ckpt.quantization, activations)  # noqa: F811
        elif activations != "fp32":
            raise PocketllmError(f"{path}: activations {activations!r} need a quantized (any4) checkpoint")
        return cls(ckpt.spec, load_weights(ckpt.dir, ckpt.weight_map), max_context=max_context)
