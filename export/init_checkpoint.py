"""`pocketllm init-checkpoint`: a randomly initialised checkpoint of a family's preset, in the exact upstream layout
(config.json, safetensors shards + index, the family's tokenizer files), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from pocketllm.export.atomic import atomic_directory
from pocketllm.export.checkpoint import expected_tensors
from pocketllm.export.checkpoint_writer import DEFAULT_SHARD_BYTES, write_config, write_weights
from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import get_family, preset_config, spec_from_config
from pocketllm.export.outputs import check_out_dir
from pocketllm.export.tokenizer import write_sentencepiece_tokenizer, write_tokenizer

# A short mixed-domain text: trains the throwaway tokenizers of random checkpoints (and calibrates quantizers).
BUILTIN_TEXT = """\
The quick brown fox jumps over the lazy dog. It is a truth universally acknowledged that a small model on a phone
must be fast, private and frugal with memory.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
In 1969, Apollo 11 landed on the Moon; 3 + 4 = 7 and the square root of 144 is 12.
Q: What is the capital of France? A: Paris. 你好，世界。 Bonjour le monde! ¿Dónde está la biblioteca?
{"name": "pocketllm", "targets": ["executorch", "coreml", "onnx"], "bits": 4.31}
"""

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def build_tokenizer(vocab_size: int, special_tokens: list[str], texts: Iterable[str], special_base: int = 0):
    """Byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained with `tokenizers`. The specials get ids
    special_base.. (0..: before the learned tokens; past them: filler tokens pad the learned ones up to the base)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    first = special_tokens if special_base == 0 else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size if special_base == 0 else min(vocab_size, special_base),
                                  special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if special_base:
        tok.add_tokens([f"<|filler_{i}|>" for i in range(tok.get_vocab_size(), special_base)])
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def special_base(spec, tokenizer) -> int:
    """Where a BPE family's consecutive specials start so that the config's bos/eos ids name the family's bos/eos
    tokens (tiny presets: 0; Qwen2-style: 151643)."""
    n, names = len(tokenizer.specials), tokenizer.specials
    wanted = [(spec.bos_token_id, tokenizer.bos)] if spec.bos_token_id is not None and tokenizer.bos else []
    wanted += [(e, tokenizer.eos) for e in spec.eos_token_ids]
    for ident, name in wanted:
        base = ident - names.index(name)
        ids = [spec.bos_token_id] if spec.bos_token_id is not None else []
        if base >= 0 and all(base <= i < base + n for i in ids + list(spec.eos_token_ids)):
            return base
    return 0


def write_random_tokenizer(out: Path, spec) -> None:
    """The family's tokenizer files, trained on BUILTIN_TEXT, with special ids that agree with the config."""
    tokenizer = get_family(spec.family).tokenizer
    if tokenizer.kind == "sentencepiece":
        first_added = spec.vocab_size - len(tokenizer.added)
        write_sentencepiece_tokenizer(out, spec.family, [BUILTIN_TEXT] * 4, pieces=first_added,
                                      added={t: first_added + i for i, t in enumerate(tokenizer.added)})
        return
    base = special_base(spec, tokenizer)
    tok = build_tokenizer(min(spec.vocab_size, 4096), list(tokenizer.specials), [BUILTIN_TEXT] * 4, base)
    write_tokenizer(out, spec.family, tok)
    tok.model.save(str(out))  # vocab.json + merges.txt, as Qwen2-style checkpoints ship them


def random_tensors(config: dict, dtype: torch.dtype, seed: int) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """Random weights for every expected tensor: normal(0, initializer_range); norms 1 + N(0, 0.05) so that parity
    tests notice a norm applied in the wrong place. Then the config-determined buffers upstream also saves."""
    spec = spec_from_config(config)
    shapes = expected_tensors(spec)
    derived = get_family(spec.family).derived_values(spec)
    std = float(config.get("initializer_range", 0.02))
    n = sum(_numel(s) for s in shapes.values()) + sum(t.numel() for t in derived.values())
    total = n * torch.tensor([], dtype=dtype).element_size()

    def gen():
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) * std
            yield name, t.to(dtype)
        for name, t in derived.items():
            yield name, t.to(dtype)

    return gen(), total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def init_checkpoint(arch: str, preset: str, out: Path, seed: int = 0, dtype: str = "bf16", force: bool = False,
                    shard_bytes: int | None = None, progress_factory=None) -> Path:
    if dtype not in DTYPES:
        raise PocketllmError(f"unknown --dtype {dtype!r} (expected bf16 or fp32)")
    check_out_dir(Path(out), force=force)
    config = preset_config(arch, preset)
    config["torch_dtype"] = TORCH_DTYPE_NAMES[DTYPES[dtype]]
    spec = spec_from_config(config)
    tensors, total = random_tensors(config, DTYPES[dtype], seed)
    if shard_bytes is None:
        # Shard real-size checkpoints like upstream does, so the sharded path is exercised by every large preset.
        shard_bytes = DEFAULT_SHARD_BYTES if total > 4 * 1024**3 else max(total // 2 + 1, 64 * 1024**2)
    with atomic_directory(Path(out), force=force) as tmp:
        write_config(tmp, config)
        write_random_tokenizer(tmp, spec)
        progress = progress_factory(total) if progress_factory else None
        write_weights(tmp, tensors, shard_bytes=shard_bytes, total_bytes=total, progress=progress)
    return Path(out)
