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


HEAD_CHOICES = ("none", *SCHEMES)  # what --lm-head / --embedding accept (besides "auto")
DEFAULT_HEAD_SCHEME = "int8"  # "auto": an 8-bit per-channel LM head (llama.cpp's 4-bit files use Q6_K there)


def resolve_head(lm_head: str | None, embedding: str | None, scheme: str, tied: bool,
                 quantize_lm_head: bool = False) -> tuple[str, str]:
    """(lm_head scheme, embedding scheme), each "none" or a scheme, from the user's choices.

    lm_head: "auto" (None) = DEFAULT_HEAD_SCHEME; "none" keeps it in floating point. quantize_lm_head (the older
    flag) means "the head in --scheme". embedding: "auto" (None) = whatever the head uses. A tied model stores the
    two as one tensor, `model.embed_tokens`: the embedding must then follow the head (or be left on auto)."""
    if quantize_lm_head:
        if lm_head not in (None, "auto", "none", scheme):
            raise PocketllmError(f"--quantize-lm-head means --lm-head {scheme}; it contradicts --lm-head {lm_head}")
        lm_head = scheme
    lm_head = DEFAULT_HEAD_SCHEME if lm_head in (None, "auto") else lm_head
    for flag, value in (("--lm-head", lm_head), ("--embedding", embedding)):
        if value not in (None, "auto", *HEAD_CHOICES):
            raise PocketllmError(f"unknown {flag} {value!r} (expected auto or one of: {', '.join(HEAD_CHOICES)})")
    if embedding in (None, "auto"):
        embedding = lm_head
    if tied and embedding != lm_head:
        raise PocketllmError(f"--embedding {embedding} differs from --lm-head {lm_head}, but this model ties the LM "
                             "head to the embedding table (tie_word_embeddings): one tensor, stored once; choose one "
                             "scheme for both (--lm-head)")
    return lm_head, embedding


def default_recipe(scheme: str, group_size: int | None = None, quantize_lm_head: bool = False,
                   keep_float: tuple[str, ...] | None = None, *, lm_head: str | None = "none",
                   embedding: str | None = "none", tied: bool = False) -> Recipe:
    """Every Linear of the decoder layers in `scheme`; the family's float modules (routers) kept; the LM head and
    the embedding table as `lm_head` / `embedding` say (resolve_head: "auto", "none" or a scheme; 4-bit schemes in
    the same group size as the layers, int8 per channel). For a tied model (`tied`) the head *is* the embedding
    table: `model.embed_tokens` is quantized once and serves both the gather and the head's matmul.

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
    head, emb = resolve_head(lm_head, embedding, scheme, tied, quantize_lm_head)

    def tq_for(s: str) -> TensorQuant | None:
        if s == "none":
            return None
        return TensorQuant(s, 0 if s == "int8" else (group_size if scheme != "int8" else DEFAULT_GROUP_SIZE))

    return Recipe((
        Rule("model.embed_tokens", tq_for(head if tied else emb)),  # tied: the head's matmul reads this table
        Rule("lm_head", None if tied else tq_for(head)),
        *(Rule(pattern, None) for pattern in keep_float),
        Rule("model.layers.*", TensorQuant(scheme, group_size)),
    ))
