"""Defaults that more than one part reads, written once (the CLI's help texts are built from these too)."""

from __future__ import annotations

from pocketllm.export.errors import PocketllmError

DEFAULT_MAX_CONTEXT = 4096  # KV cache positions when --max-context is not given (capped by the model's maximum)
DEFAULT_PREFILL_CHUNK = 256  # most tokens per forward call of an exported program
DEFAULT_GROUP_SIZE = 128  # 4-bit schemes' group along K


def resolve_max_context(spec, max_context: int | None) -> int:
    """`max_context` checked against the model, or the default min(max_position_embeddings, DEFAULT_MAX_CONTEXT)."""
    if max_context is None:
        return min(spec.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if max_context <= 0 or max_context > spec.max_position_embeddings:
        raise PocketllmError(f"max_context {max_context} must be between 1 and the model's "
                             f"max_position_embeddings ({spec.max_position_embeddings})")
    return max_context

# Sampling (`pocketllm generate` without --greedy)
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
