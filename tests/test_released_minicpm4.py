"""Acceptance of issue #9: a checkpoint shaped exactly like the released MiniCPM4-0.5B loads, generates, exports and
passes parity, and ExecuTorch's own TextLLMRunner with the bundle's tokenizer.model generates the same greedy text.

The checkpoint is `released_like(...)` (export/families/minicpm4/presets.py): the released config.json's keys and
values (no model_type, no rope_theta, no tie_word_embeddings, no sparse_config, LongRoPE with original = max and the
released factor list, rms_norm_eps 1e-5, muP 12 / 1.4 / 256, bf16, EOS [2, <|im_end|>]) at a small shape (1 layer,
hidden 128, 2 heads of 64 over 1 KV head), and the tokenizer files upstream ships without tokenizer.json: a
SentencePiece tokenizer.model with byte fallback, added_tokens.json (<|im_end|> .. <|fim_suffix|> at the last 8
ids), tokenizer_config.json, special_tokens_map.json.

Random weights with two changes that keep the text comparison meaningful: the attention and MLP outputs are scaled
up (x8) so that the greedy text varies instead of repeating the prompt's last token (tied embeddings dominate
otherwise), and the embedding rows of byte-fallback, unused, control and added pieces are zero so that greedy
decoding never picks them: ExecuTorch's SentencePiece decoder prints byte pieces as "<0xE4>" text (only <0x0A> is
translated) and control pieces as " ", where pocketllm decodes bytes and skips special tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketllm.export.atomic import atomic_directory
from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.checkpoint_writer import write_config, write_weights
from pocketllm.export.cli.main import app
from pocketllm.export.families import spec_from_config
from pocketllm.export.families.minicpm4.presets import released_like
from pocketllm.export.init_checkpoint import random_tensors, write_random_tokenizer
from pocketllm.export.tokenizer import load_tokenizer
from tests.families.test_upstream_fidelity import RELEASED_0_5B_CONFIG
from tests.kernels import build_kernels

VOCAB = 608  # 600 SentencePiece pieces + the 8 added tokens
SHAPE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)
MAX_CONTEXT = 256
PROMPTS = ["It is a truth universally acknowledged", "The quick brown fox"]
NEW_TOKENS = 24
UPSTREAM_TOKENIZER_FILES = {"tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"}
# The released tokenizer_config.json's keys (LlamaTokenizer), and its special tokens.
UPSTREAM_TOKENIZER_CONFIG_KEYS = {
    "add_bos_token", "add_eos_token", "add_prefix_space", "added_tokens_decoder", "additional_special_tokens",
    "bos_token", "chat_template", "clean_up_tokenization_spaces", "eos_token", "legacy", "model_max_length",
    "pad_token", "sp_model_kwargs", "spaces_between_special_tokens", "tokenizer_class", "unk_token",
    "use_default_system_prompt"}
ADDED = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>", "<|fim_prefix|>",
         "<|fim_middle|>", "<|fim_suffix|>"]
runner = CliRunner()


def write_released_like(out: Path, seed: int = 1, gain: float = 8.0) -> Path:
    """The checkpoint of the module docstring, written atomically."""
    import sentencepiece as spm
    import torch

    config = released_like(**SHAPE)
    spec = spec_from_config(config)
    tensors, total = random_tensors(config, torch.bfloat16, seed)
    with atomic_directory(out) as tmp:
        write_config(tmp, config)
        write_random_tokenizer(tmp, spec)
        (tmp / "tokenizer.json").unlink()  # upstream's files, SentencePiece only
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
        n = sp.get_piece_size()
        muted = [i for i in range(VOCAB) if i >= n or sp.is_byte(i) or sp.is_unused(i) or sp.is_control(i)
                 or sp.is_unknown(i)]

        def adjusted(items):
            for name, t in items:
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    t = (t.float() * gain).to(t.dtype)
                elif name == "model.embed_tokens.weight":
                    t = t.clone()
                    t[muted] = 0
                yield name, t

        write_weights(tmp, adjusted(tensors), total_bytes=total)
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released_like(tmp_path_factory.mktemp("released") / "minicpm4-0.5b-like")


@pytest.fixture(scope="module")
def bundle(released, tmp_path_factory) -> Path:
    build_kernels()
    out = tmp_path_factory.mktemp("released-bundle") / "bundle"
    r = runner.invoke(app, ["export", "--checkpoint", str(released), "--target", "executorch", "--max-context",
                            str(MAX_CONTEXT), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_checkpoint_is_the_released_config_and_tokenizer_files(released):
    config = json.loads((released / "config.json").read_text())
    assert list(config) == list(RELEASED_0_5B_CONFIG)  # the released keys, in the released order
    shape_keys = set(SHAPE) | {"eos_token_id"}
    assert {k: v for k, v in config.items() if k not in shape_keys} == \
        {k: v for k, v in RELEASED_0_5B_CONFIG.items() if k not in shape_keys}
    assert config["eos_token_id"] == [2, VOCAB - 8]
    names = {p.name for p in released.iterdir()}
    assert UPSTREAM_TOKENIZER_FILES <= names and "tokenizer.json" not in names
    tok_cfg = json.loads((released / "tokenizer_config.json").read_text())
    assert set(tok_cfg) == UPSTREAM_TOKENIZER_CONFIG_KEYS and tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<s>", "<|im_end|>", "<unk>")
    assert tok_cfg["additional_special_tokens"] == ADDED and tok_cfg["add_bos_token"] is True
    assert {int(i): t["content"] for i, t in tok_cfg["added_tokens_decoder"].items()} == \
        {0: "<unk>", 1: "<s>", 2: "</s>", **{VOCAB - 8 + k: t for k, t in enumerate(ADDED)}}
    assert json.loads((released / "added_tokens.json").read_text()) == {t: VOCAB - 8 + k for k, t in enumerate(ADDED)}


def test_loads(released):
    """open_checkpoint: the family from `architectures`, upstream's defaults for every absent key."""
    ckpt = open_checkpoint(released)
    spec = ckpt.spec
    assert spec.family == "minicpm4" and spec.head_dim == 64 and spec.tie_word_embeddings and spec.sparse is None
    assert spec.rope.theta == 10000.0 and spec.rope.attention_scaling == 1.0 and spec.rms_norm_eps == 1e-5
    assert {f.name for f in ckpt.tokenizer_files} == UPSTREAM_TOKENIZER_FILES
    tok = load_tokenizer(released, spec.bos_token_id)
    assert tok.kind == "sentencepiece" and tok.added["<|im_end|>"] == spec.eos_token_ids[1]


def test_generate_torch_and_reference_agree(released):
    """`pocketllm generate` (default --max-context) on the checkpoint: the torch model and the numpy reference give
    the same greedy text."""
    for prompt in PROMPTS:
        texts = []
        for engine in ("torch", "reference"):
            r = runner.invoke(app, ["generate", "--checkpoint", str(released), "--prompt", prompt, "--greedy",
                                    "--max-new-tokens", str(NEW_TOKENS), "--engine", engine])
            assert r.exit_code == 0, r.output
            texts.append(r.stdout.splitlines()[0])
        assert texts[0] == texts[1]
        assert len(set(texts[0][len(prompt):])) > 8  # varied text, not one token repeated


def test_bundle_carries_the_sentencepiece_tokenizer(released, bundle):
    """Manifest tokenizer kind/file/num_bos for a SentencePiece-only checkpoint; every tokenizer file is copied and
    the bundle's tokenizer.model holds the added tokens as user-defined pieces at their ids (ExecuTorch's runner
    samples over its tokenizer's pieces only: without them it could never emit <|im_end|>)."""
    import sentencepiece as spm

    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    assert (tok["kind"], tok["file"], tok["num_bos"], tok["bos_id"]) == ("sentencepiece", "tokenizer.model", 1, 1)
    assert set(tok["files"]) == UPSTREAM_TOKENIZER_FILES and tok["eos_ids"] == [2, VOCAB - 8]
    assert manifest["chat"]["stop_ids"] == [VOCAB - 8]
    assert "infllm_v2" not in manifest["attention"]  # the released 0.5B is dense
    sp = spm.SentencePieceProcessor(model_file=str(bundle / "tokenizer.model"))
    added = json.loads((released / "added_tokens.json").read_text())
    assert sp.get_piece_size() == VOCAB
    assert all(sp.id_to_piece(i) == t and sp.is_control(i) is False for t, i in added.items())
    ours, theirs = load_tokenizer(released, 1), load_tokenizer(bundle, 1)
    text = "<|im_start|>user\nIt is a truth<|im_end|>\n"
    ids = ours.encode(text)
    assert ids == theirs.encode(text) and ids[1] == added["<|im_start|>"] and added["<|im_end|>"] in ids
    assert ours.decode(ids) == theirs.decode(ids) and "<|" not in theirs.decode(ids)  # special: skipped


def test_parity(bundle):
    r = runner.invoke(app, ["parity", str(bundle), "--steps", "32"])
    assert r.exit_code == 0, r.output
    report = json.loads((bundle / "parity.json").read_text())["executorch"]
    assert report["passed"] and report["continuations_identical"] and report["max_abs_delta"] <= 1e-3


RUNNER_SCRIPT = """
import sys
from pocketllm.runtime_py.runners.executorch import load_llama_ops
load_llama_ops()
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
bundle, tokenizer, n, num_bos = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = TextLLMRunner(bundle + "/model.pte", bundle + "/" + tokenizer)
for prompt in sys.argv[5:]:
    pieces = []
    r.generate(prompt, GenerationConfig(echo=False, max_new_tokens=n, temperature=0.0, num_bos=num_bos),
               token_callback=pieces.append)
    r.reset()
    sys.stdout.write("RESULT:" + "".join(pieces) + "\\n")
"""


def test_textllmrunner_with_the_bundles_tokenizer_model_generates_pocketllms_greedy_text(released, bundle):
    """ExecuTorch's C++ TextLLMRunner (Python binding) on model.pte + the bundle's tokenizer.model, with the
    manifest's num_bos: the same greedy text as `pocketllm generate --engine executorch` and as the numpy reference
    on the checkpoint."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    proc = subprocess.run([sys.executable, "-c", RUNNER_SCRIPT, str(bundle), tok["file"], str(NEW_TOKENS),
                           str(tok["num_bos"]), *PROMPTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = [line[len("RESULT:"):] for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert len(theirs) == len(PROMPTS)
    for prompt, continuation in zip(PROMPTS, theirs):
        ours = []
        for args in (["--engine", "executorch", "--bundle", str(bundle)],
                     ["--engine", "reference", "--checkpoint", str(released)]):
            r = runner.invoke(app, ["generate", "--prompt", prompt, "--greedy", "--max-new-tokens", str(NEW_TOKENS),
                                    *args])
            assert r.exit_code == 0, r.output
            ours.append(r.stdout.splitlines()[0])
        assert ours[0] == ours[1] == prompt + continuation
    assert any(c.startswith(" ") for c in theirs)  # decoded in context: a first "▁piece" keeps its space


@pytest.mark.slow
def test_the_full_0_5b_preset(tmp_path):
    """`init-checkpoint --preset 0.5b` (bf16, real shapes): the released config.json exactly, loads, and its
    tokenizer maps 73440 to <|im_end|> (EOS [2, 73440] = </s>, <|im_end|>)."""
    out = tmp_path / "m05"
    r = runner.invoke(app, ["init-checkpoint", "--arch", "minicpm4", "--preset", "0.5b", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text()) == RELEASED_0_5B_CONFIG
    ckpt = open_checkpoint(out)
    assert ckpt.spec.vocab_size == 73448 and ckpt.spec.eos_token_ids == (2, 73440)
    assert UPSTREAM_TOKENIZER_FILES | {"tokenizer.json"} <= {p.name for p in out.iterdir()}  # as upstream ships
    hf = load_tokenizer(out, 1)  # tokenizer.json first
    assert hf.kind == "huggingface" and hf.backend.token_to_id("<|im_end|>") == 73440
    assert hf.backend.id_to_token(2) == "</s>" and hf.encode_plain("<|im_end|>") == [73440]
    (out / "tokenizer.json").unlink()
    sp = load_tokenizer(out, 1)  # the SentencePiece model + added_tokens.json
    assert sp.kind == "sentencepiece" and sp.backend.get_piece_size() == 73440 and sp.backend.id_to_piece(2) == "</s>"
    assert sp.added["<|im_end|>"] == 73440 and sp.encode_plain("<|im_end|>") == [73440]
    assert json.loads((out / "added_tokens.json").read_text())["<|fim_suffix|>"] == 73447
    text = "It is a truth universally acknowledged"
    assert sp.encode(text) == hf.encode(text) and sp.decode(sp.encode(text)) == text


@pytest.mark.slow
def test_the_smallthinker_4b_preset_tokenizer_has_qwen2s_specials_at_the_config_ids(tmp_path):
    """SmallThinker-4BA0.6B (Qwen2 BPE): <|endoftext|> 151643 (bos, eos), <|im_start|> 151644, <|im_end|> 151645."""
    from pocketllm.export.families import preset_config
    from pocketllm.export.init_checkpoint import write_random_tokenizer

    config = preset_config("smallthinker", "4b-a0.6b")
    write_random_tokenizer(tmp_path, spec_from_config(config))
    tok = load_tokenizer(tmp_path, config["bos_token_id"]).backend
    assert [tok.id_to_token(i) for i in (151643, 151644, 151645)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
