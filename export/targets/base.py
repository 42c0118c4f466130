"""What a target is: the record each `export/targets/<name>/` package exposes as `TARGET`.

A target turns a loaded torch model (export/nn, possibly with packed quantized linears) into an artifact in the
bundle directory and returns the manifest's `targets.<name>` entry. It owns:
- its options (a dataclass with its defaults, validated before any model is loaded),
- the module swaps its runtime needs (a KV-cache or attention-core module, a state module, an MoE dispatch; never a
  re-implemented forward),
- how it lowers each pocketllm op (`lowerings`: a kernel, a converter, a decomposition, or "unsupported" with the
  reason), checked against the op registry by tests/ops/test_registry.py,
- the lowering itself, with its SDK imported only inside its own folder.
Runners for the artifact live in `runtime_py/runners/<name>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pocketllm.export.defaults import DEFAULT_PREFILL_CHUNK
from pocketllm.export.errors import PocketllmError

LOWERING_KINDS = ("kernel", "converter", "decomposition", "unsupported")


@dataclass(frozen=True)
class Lowering:
    """How a target runs one pocketllm op: `kind` from LOWERING_KINDS; `detail` names the kernel source, the
    converter or decomposition, or says why the op is unsupported."""

    kind: str
    detail: str

    def __post_init__(self):
        if self.kind not in LOWERING_KINDS:
            raise ValueError(f"Lowering kind must be one of {LOWERING_KINDS} (got {self.kind!r})")


@dataclass(frozen=True)
class CommonOptions:
    """What every target's options share; the pipeline fills them from the CLI. Targets subclass with more."""

    max_context: int
    quant: str = "none"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    group_size: int | None = None


class Target:
    """Base class; subclasses set the class attributes and implement `export`."""

    name: str = ""
    summary: str = ""
    artifact: str = ""  # what it writes into the bundle (file or folder name)
    quant_schemes: tuple[str, ...] = ()  # --quant values it accepts
    sdk: str = ""  # pip requirement of its SDK, for the "install it" message
    options_class: type = CommonOptions
    lowerings: dict[str, Lowering] = {}
    quantized_lm_head: bool = True  # its artifact can hold a quantized LM head / embedding table (pocketllm's ops)

    def options(self, **values: Any):
        """The target's options from the pipeline's values (one-line PocketllmError when invalid). Values beyond
        CommonOptions' (e.g. `experts`) are target options: a target whose options lack one refuses it."""
        import dataclasses

        if values.get("quant", "none") not in self.quant_schemes:
            raise PocketllmError(f"--quant {values.get('quant')!r} is not available for --target {self.name} "
                                 f"(expected one of: {', '.join(self.quant_schemes)})")
        known = {f.name for f in dataclasses.fields(self.options_class)}
        for key in values:
            if key not in known:
                raise PocketllmError(f"--{key.replace('_', '-')} is not available for --target {self.name}")
        return self.options_class(**values)

    def check_sdk(self) -> None:
        """Fail with one line naming what to install when the target's SDK is missing."""

    def check(self, ckpt, options) -> None:
        """Refuse (one PocketllmError line) a checkpoint the target cannot export with these options, from what
        `plan` knows without reading weight data (config, tensor shapes and dtypes, quantization)."""

    def warnings(self, options) -> list[str]:
        """One-line notes the user should read before exporting with these options (valid but surprising)."""
        return []

    def export(self, model, spec, options, out_dir: Path, stage: Callable[[str], Any]) -> dict[str, Any]:
        """Write the artifact into out_dir; return the manifest's `targets.<name>` entry."""
        raise NotImplementedError

    def add_tokenizer(self, out_dir: Path, names: list[str]) -> None:
        """Called once the bundle's tokenizer files (`names`, in out_dir) are written: copy what the artifact needs
        beside itself (ONNX: onnxruntime-genai reads them from the model folder). Default: nothing."""


def weight_bytes(ckpt, float_bytes: int) -> int:
    """About how many bytes the checkpoint's weights take in an artifact that stores floating-point tensors in
    `float_bytes` each and packed quantized tensors as packed; from the tensor table (no weight data read)."""
    q = ckpt.quantization
    total = 0
    for name, shape in ckpt.shapes.items():
        n = 1
        for d in shape:
            n *= d
        packed = q is not None and q.is_packed(name)
        total += n * ({"U8": 1, "I8": 1, "F16": 2}.get(ckpt.dtypes[name], float_bytes) if packed else float_bytes)
    return total
