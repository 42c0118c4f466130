"""What to quantize: an ordered set of module-name rules, the first match wins.

A recipe knows nothing about packing, backends or the math of a scheme: it only answers "which scheme and group
size for this module, or keep it in floating point?". Module names are tensor names without `.weight`, in upstream
naming (`model.layers.3.self_attn.q_proj`). Patterns are shell-style (`fnmatch`: `*` also crosses dots).
Only 2-D `.weight` tensors are candidates; norms, embeddings and everything unmatched stay as they are.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from pocketllm.export.defaults import DEFAULT_GROUP_SIZE
from pocketllm.export.errors import PocketllmError
from pocketllm.export.quant.format import SCHEMES, TensorQuant, check_tensor_quant



@dataclass(frozen=True)
class Rule:
    pattern: str
    quant: TensorQuant | None  # None: keep in floating point


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]

    def resolve(self, module: str) -> TensorQuant | None:
        for rule in self.rules:
            if fnmatch.fnmatchcase(module, rule.pattern):
                return rule.quant
        return None

    def plan(self, tensors: dict[str, tuple[int, ...]], where: str = "quantize") -> dict[str, TensorQuant]:
        """module -> TensorQuant for every 2-D `.weight` a rule quantizes; checks each one fits (group size, ...).
        A group size that does not divide some width is refused with one that divides them all."""
        chosen: dict[str, tuple[TensorQuant, tuple[int, ...]]] = {}
        for name, shape in tensors.items():
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            module = name[:-len(".weight")]
            tq = self.resolve(module)
            if tq is not None:
                chosen[module] = (tq, shape)
        widths = [shape[1] for _, shape in chosen.values()]
        for module, (tq, shape) in chosen.items():
            try:
                check_tensor_quant(tq, module, shape, where)
            except PocketllmError as e:
                g = tq.group_size
                if isinstance(g, int) and g > 0 and shape[1] % g:
                    raise PocketllmError(f"{e}; {suggest_group_size(g, widths)}") from None
                raise
        return {module: tq for module, (tq, _) in chosen.items()}


def suggest_group_size(group_size: int, widths: list[int]) -> str:
    """Advice for a group size that does not divide every input width: the largest power of two <= group_size that
    divides them all (4-bit packing needs an even group), else one group per row."""
    common = math.gcd(*widths)
    g = 1 << (min(group_size, common).bit_length() - 1)
    while g > 1 and common % g:
        g //= 2
    if g >= 2:
        return f"--group-size {g} divides every quantized width of this model (or 0: one group per row)"
    return "use --group-size 0 (one group per row): no even group size divides every quantized width"


def default_recipe(scheme: str, group_size: int | None = None, quantize_lm_head: bool = False,
                   keep_float: tuple[str, ...] | None = None) -> Recipe:
    """Every Linear of the decoder layers in `scheme`; embeddings, the family's float modules (routers) and (unless
    asked) lm_head kept.

    group_size None: 128 for the 4-bit schemes, per channel (0) for int8. 0 = one group per row.
    keep_float: module patterns kept in floating point (a family's `float_modules`); None: every family's.
    """
    if scheme not in SCHEMES:
        raise PocketllmError(f"unknown --scheme {scheme!r} (expected one of: {', '.join(SCHEMES)})")
    if group_size is None:
        group_size = 0 if scheme == "int8" else DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise PocketllmError(f"--group-size must be 0 (one group per row) or a positive integer (got {group_size})")
    if scheme == "int8" and group_size:
        raise PocketllmError(f"--group-size {group_size}: int8 is per output channel, it takes no group size "
                             "(leave --group-size out)")
    if keep_float is None:
        from pocketllm.export.families import families

        keep_float = tuple(p for f in families().values() for p in f.float_modules)
    tq = TensorQuant(scheme, group_size)
    return Recipe((
        Rule("model.embed_tokens", None),  # a lookup table, not a matmul
        Rule("lm_head", tq if quantize_lm_head else None),  # the most sensitive matmul: opt-in
        *(Rule(pattern, None) for pattern in keep_float),
        Rule("model.layers.*", tq),
    ))
