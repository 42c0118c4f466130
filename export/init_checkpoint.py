"""Write checkpoints in the exact upstream layout: config.json, safetensors shards (+ index), tokenizer files.

Used by `pocketllm init-checkpoint` (random weights for presets) and by the tiny-austen training script. Every
write goes to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from pocketllm.export.checkpoint import INDEX_FILE, SINGLE_FILE, derived_tensors, expected_tensors
from pocketllm.export.errors import PocketllmError
from pocketllm.export.presets import preset_config
from pocketllm.export.spec import spec_from_config

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
DEFAULT_SHARD_BYTES = 2 * 1024**3


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; move it to `out` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PocketllmError(f"{out}: already exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _relax_permissions(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _relax_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the permissions a plain mkdir/open would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def build_tokenizer(vocab_size: int, special_tokens: list[str], texts: Iterable[str]):
    """Byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained with `tokenizers`; specials get ids 0.."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config(bos: str | None, eos: str, unk: str | None, chat_template: str | None = None) -> dict:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": unk,
           "add_bos_token": bos is not None, "model_max_length": 1_000_000}
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Special tokens per family, in id order from 0: what upstream's tokenizers call them.
SPECIALS = {
    "minicpm4": (["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], "<s>", "</s>", "<unk>"),
    "smallthinker": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", None),
    # MiniMaxConfig's defaults: bos 1, eos 2
    "minimax": (["<end_of_document>", "<beginning_of_sentence>", "<end_of_sentence>"], "<beginning_of_sentence>",
                "<end_of_sentence>", None),
}


def write_tokenizer(out: Path, family: str, tokenizer) -> None:
    names, bos, eos, unk = SPECIALS[family]
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(bos, eos, unk, CHATML), indent=2) + "\n")
    special_map = {k: v for k, v in {"bos_token": bos, "eos_token": eos, "unk_token": unk}.items() if v}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def write_weights(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = DEFAULT_SHARD_BYTES,
                  total_bytes: int | None = None, progress=None) -> None:
    """Save tensors as model.safetensors, or as numbered shards + index when they exceed `shard_bytes`."""
    from safetensors.torch import save_file

    single = total_bytes is not None and total_bytes <= shard_bytes
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    tmp_names: list[str] = []

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"shard-{len(tmp_names):05d}.tmp"
        save_file(pending, str(out / name), metadata={"format": "pt"})
        tmp_names.append(name)
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and pending_bytes + nbytes > shard_bytes and not single:
            flush()
        pending[name] = t.contiguous()
        pending_bytes += nbytes
        if progress is not None:
            progress(nbytes)
    flush()

    if len(tmp_names) == 1:
        os.replace(out / tmp_names[0], out / SINGLE_FILE)
        return
    n = len(tmp_names)
    total = 0
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({name: final for name in names})
        total += (out / final).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def derived_values(spec) -> dict[str, torch.Tensor]:
    """The config-determined buffers upstream saves too (`derived_tensors`), computed the way upstream does, so
    that upstream loads our checkpoints without missing keys. pocketllm never reads them back.

    MiniMax lightning layers: slope_rate s [H,1,1]; for r = 1..B: query_decay exp(-s r), key_decay exp(-s (B - r)),
    diagonal_decay exp(-s (r_i - r_j)) where r_i >= r_j, else 0.
    """
    from pocketllm.export.ops.lightning_attention import lightning_decay_rates

    shapes = derived_tensors(spec)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(spec.layers):
        a = f"model.layers.{i}.self_attn."
        if a + "slope_rate" not in shapes:
            continue
        s = lightning_decay_rates(spec.num_heads, i, spec.num_layers)[:, None, None]  # [H, 1, 1]
        r = torch.arange(spec.lightning.block_size) + 1
        gap = (r[:, None] - r[None, :])[None, None] * s  # [1, H, B, B]
        out[a + "slope_rate"] = s
        out[a + "query_decay"] = torch.exp(-s * r[:, None])
        out[a + "key_decay"] = torch.exp(-s * (spec.lightning.block_size - r[:, None]))
        out[a + "diagonal_decay"] = torch.exp(torch.where(gap >= 0, -gap, float("-inf")))
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    return out


def random_tensors(config: dict, dtype: torch.dtype, seed: int) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """Random weights for every expected tensor: normal(0, initializer_range); norms 1 + N(0, 0.05) so that parity
    tests notice a norm applied in the wrong place. Then the config-determined buffers upstream also saves."""
    spec = spec_from_config(config)
    shapes = expected_tensors(spec)
    derived = derived_values(spec)
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
    config = preset_config(arch, preset)
    config["torch_dtype"] = TORCH_DTYPE_NAMES[DTYPES[dtype]]
    spec = spec_from_config(config)
    tensors, total = random_tensors(config, DTYPES[dtype], seed)
    if shard_bytes is None:
        # Shard real-size checkpoints like upstream does, so the sharded path is exercised by every large preset.
        shard_bytes = DEFAULT_SHARD_BYTES if total > 4 * 1024**3 else max(total // 2 + 1, 64 * 1024**2)
    names, _, _, _ = SPECIALS[spec.family]
    with atomic_directory(Path(out), force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok = build_tokenizer(min(spec.vocab_size, 4096), names, [BUILTIN_TEXT] * 4)
        write_tokenizer(tmp, spec.family, tok)
        progress = progress_factory(total) if progress_factory else None
        write_weights(tmp, tensors, shard_bytes=shard_bytes, total_bytes=total, progress=progress)
    return Path(out)
