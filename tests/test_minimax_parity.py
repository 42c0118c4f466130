"""MiniMax (model_type "minimax") against transformers' own MiniMaxForCausalLM, the parity oracle.

A tiny fp32 MiniMaxConfig model is created and written by transformers itself (`save_pretrained`); our torch model
and our numpy reference must reproduce its logits within 1e-4, for a prefill and for step-by-step decode, on prompts
shorter than, equal to and longer than the lightning block size. Two transformers 5.23 quirks are worked around
here and described in docs/lightning.md: decode must pass explicit position_ids (MiniMaxCache.get_seq_length reads
layer 0, which is a lightning layer here, and reports 0), and partial RoPE needs transformers' MiniMax-M2 rotary
code (the MiniMax class ignores partial_rotary_factor).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.errors import PocketllmError
from pocketllm.export.init_checkpoint import init_checkpoint
from pocketllm.export.nn import load_model
from pocketllm.export.ops.lightning_attention import lightning_decay_rates
from pocketllm.runtime_py import ReferenceModel

transformers = pytest.importorskip("transformers")
hf_minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")

BLOCK = 8  # transformers' config allows any lightning block size: small blocks keep prompts short
PROMPTS = {"short": 5, "one_block": BLOCK, "three_blocks_ragged": 3 * BLOCK + 3}
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_config(**overrides):
    kwargs = dict(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        block_size=BLOCK, initializer_range=0.15, rms_norm_eps=1e-5,
        # DeepNorm-style weights that differ per sublayer kind, so a swapped alpha/beta cannot pass
        full_attn_alpha_factor=1.6, full_attn_beta_factor=0.9, linear_attn_alpha_factor=1.3,
        linear_attn_beta_factor=1.1, mlp_alpha_factor=1.5, mlp_beta_factor=0.8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.MiniMaxConfig(**kwargs)


def hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.MiniMaxForCausalLM(config).float().eval()


def hf_logits(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits, step-by-step decode logits) from transformers, each [T, V] float32."""
    t = torch.as_tensor(ids)[None]
    with torch.no_grad():
        prefill = model(t).logits[0]
        cache, rows = hf_minimax.MiniMaxCache(), []
        for i in range(len(ids)):
            out = model(t[:, i:i + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[i]]))
            rows.append(out.logits[0])
    return prefill.numpy(), torch.cat(rows).numpy()


def our_logits(directory, ids: np.ndarray) -> dict[str, np.ndarray]:
    model, _ = load_model(directory, max_context=64, dtype="fp32")
    ref = ReferenceModel.from_checkpoint(directory, max_context=64)
    t = torch.as_tensor(ids)[None]
    with torch.no_grad():
        torch_prefill = model(t, 0)[0].numpy()
        model.reset_cache()
        torch_decode = torch.cat([model(t[:, i:i + 1], i)[0] for i in range(len(ids))]).numpy()
    ref_prefill = ref.forward(ids, 0)
    ref.reset()
    ref_decode = np.concatenate([ref.forward(ids[i:i + 1], i) for i in range(len(ids))])
    return {"torch_prefill": torch_prefill, "torch_decode": torch_decode, "reference_prefill": ref_prefill,
            "reference_decode": ref_decode}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    model = hf_model(hf_config())
    directory = tmp_path_factory.mktemp("minimax") / "hf"
    model.save_pretrained(directory)
    return model, directory


# -------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_torch_and_reference_match_transformers(saved, prompt):
    model, directory = saved
    ids = np.random.default_rng(PROMPTS[prompt]).integers(0, 160, PROMPTS[prompt])
    hf_prefill, hf_decode = hf_logits(model, ids)
    assert np.abs(hf_prefill).max() > 1.0  # logits large enough for 1e-4 to mean something
    for name, logits in our_logits(directory, ids).items():
        oracle = hf_prefill if name.endswith("prefill") else hf_decode
        assert logits.shape == oracle.shape == (len(ids), 160)
        err = np.abs(logits - oracle).max()
        assert err <= TOL, f"{name} vs transformers ({prompt}, T={len(ids)}): max |diff| {err:.2e}"


def test_prefill_then_decode_matches_transformers(saved):
    """Prefill 2 blocks + 3 tokens, then decode 5 more: transformers decodes after its own prefill too."""
    model, directory = saved
    ids = np.random.default_rng(9).integers(0, 160, 2 * BLOCK + 8)
    P = 2 * BLOCK + 3
    t = torch.as_tensor(ids)[None]
    ours, _ = load_model(directory, max_context=64, dtype="fp32")
    ref = ReferenceModel.from_checkpoint(directory, max_context=64)
    with torch.no_grad():
        cache = hf_minimax.MiniMaxCache()
        hf = [model(t[:, :P], past_key_values=cache, use_cache=True).logits[0]]
        hf += [model(t[:, i:i + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[i]])).logits[0]
               for i in range(P, len(ids))]
        mine = [ours(t[:, :P], 0)[0]] + [ours(t[:, i:i + 1], i)[0] for i in range(P, len(ids))]
    oracle = torch.cat(hf).numpy()
    refs = np.concatenate([ref.forward(ids[:P], 0)] + [ref.forward(ids[i:i + 1], i) for i in range(P, len(ids))])
    assert np.abs(torch.cat(mine).numpy() - oracle).max() <= TOL
    assert np.abs(refs - oracle).max() <= TOL


def test_decay_rates_match_the_saved_slope_rate(saved):
    from safetensors import safe_open

    model, directory = saved
    spec = open_checkpoint(directory).spec
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        for i, layer in enumerate(spec.layers):
            if layer.attention == "lightning":
                saved_rate = f.get_tensor(f"model.layers.{i}.self_attn.slope_rate").flatten()
                assert torch.allclose(lightning_decay_rates(spec.num_heads, i, spec.num_layers), saved_rate,
                                      rtol=1e-6, atol=0)


def test_partial_rope_matches_transformers_rotary_code(tmp_path, monkeypatch):
    """partial_rotary_factor 0.5 (MiniMax's real layout): transformers' MiniMax class ignores it, so the oracle
    borrows the rotary code of its sibling MiniMax-M2, which honours it (first rotary_dim channels rotate)."""
    m2 = pytest.importorskip("transformers.models.minimax_m2.modeling_minimax_m2")
    monkeypatch.setattr(hf_minimax, "apply_rotary_pos_emb", m2.apply_rotary_pos_emb)
    monkeypatch.setattr(hf_minimax.MiniMaxRotaryEmbedding, "compute_default_rope_parameters",
                        staticmethod(m2.MiniMaxM2RotaryEmbedding.compute_default_rope_parameters))
    config = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                       layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"])
    model = hf_model(config, seed=1)
    assert model.model.rotary_emb.inv_freq.numel() == 2  # rotary_dim 4 of head_dim 8
    model.save_pretrained(tmp_path / "partial")
    assert open_checkpoint(tmp_path / "partial").spec.rope.dim == 4
    ids = np.random.default_rng(3).integers(0, 160, 2 * BLOCK + 3)
    hf_prefill, hf_decode = hf_logits(model, ids)
    for name, logits in our_logits(tmp_path / "partial", ids).items():
        oracle = hf_prefill if name.endswith("prefill") else hf_decode
        assert np.abs(logits - oracle).max() <= TOL, name


def test_init_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, monkeypatch):
    """`init-checkpoint --arch minimax --preset tiny` writes what save_pretrained writes: transformers loads it with
    no missing or unexpected key and computes our logits (its partial RoPE patched in as above)."""
    m2 = pytest.importorskip("transformers.models.minimax_m2.modeling_minimax_m2")
    monkeypatch.setattr(hf_minimax, "apply_rotary_pos_emb", m2.apply_rotary_pos_emb)
    monkeypatch.setattr(hf_minimax.MiniMaxRotaryEmbedding, "compute_default_rope_parameters",
                        staticmethod(m2.MiniMaxM2RotaryEmbedding.compute_default_rope_parameters))
    directory = init_checkpoint("minimax", "tiny", tmp_path / "tiny", seed=2, dtype="fp32")
    model, info = transformers.MiniMaxForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                  attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.random.default_rng(4).integers(0, 512, 40)  # > block 32
    with torch.no_grad():
        oracle = model.float().eval()(torch.as_tensor(ids)[None]).logits[0].numpy()
    ours = our_logits(directory, ids)
    assert np.abs(ours["torch_prefill"] - oracle).max() <= TOL
    assert np.abs(ours["reference_prefill"] - oracle).max() <= TOL


def test_sliding_window_on_the_softmax_layers(tmp_path):
    config = hf_config(sliding_window=5,
                       layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"])
    model = hf_model(config, seed=2)
    model.save_pretrained(tmp_path / "swa")
    assert open_checkpoint(tmp_path / "swa").spec.layers[0].sliding_window == 5
    ids = np.random.default_rng(6).integers(0, 160, BLOCK + 7)
    hf_prefill, hf_decode = hf_logits(model, ids)
    for name, logits in our_logits(tmp_path / "swa", ids).items():
        assert np.abs(logits - (hf_prefill if name.endswith("prefill") else hf_decode)).max() <= TOL, name


def test_config_defaults_are_transformers_defaults(saved):
    """Keys a config.json may omit mean what MiniMaxConfig's defaults mean."""
    from pocketllm.export.families import spec_from_config

    _, directory = saved
    cfg = json.loads((directory / "config.json").read_text())
    for key in ("layer_types", "block_size", "rms_norm_eps", "rope_parameters", "mlp_alpha_factor",
                "num_local_experts", "num_experts_per_tok", "tie_word_embeddings"):
        cfg.pop(key)
    spec = spec_from_config(cfg)
    defaults = transformers.MiniMaxConfig(num_hidden_layers=4)
    assert [layer.attention == "lightning" for layer in spec.layers] == [
        t == "linear_attention" for t in defaults.layer_types]
    assert spec.lightning.block_size == defaults.block_size and spec.rms_norm_eps == defaults.rms_norm_eps
    assert spec.rope.theta == defaults.rope_parameters["rope_theta"] and spec.rope.dim == spec.head_dim
    assert spec.moe.num_experts == defaults.num_local_experts and spec.moe.top_k == defaults.num_experts_per_tok
    assert spec.layers[0].mlp_alpha == defaults.mlp_alpha_factor and not spec.tie_word_embeddings


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_layer_type_is_one_line(saved, tmp_path):
    _, directory = saved
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["layer_types"][2] = "mamba_attention"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketllmError) as e:
        open_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "layer_types[2]" in msg and "'mamba_attention'" in msg and "linear_attention" in msg
    cfg["layer_types"] = cfg["layer_types"][:3]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketllmError, match="a list of 4 entries"):
        open_checkpoint(bad)


def test_decay_table_of_the_wrong_block_size_is_one_line(saved, tmp_path):
    """The saved decay tables must fit block_size: a config edited to another block size is caught up front."""
    _, directory = saved
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["block_size"] = 2 * BLOCK
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PocketllmError) as e:
        open_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and "_decay' has shape" in msg and f"{2 * BLOCK}, " in msg.split("expected")[1]


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_logits_on_a_transformers_checkpoint(saved, tmp_path):
    from pocketllm.export.cli.main import app

    model, directory = saved
    ids = np.random.default_rng(5).integers(0, 160, BLOCK + 5)
    hf_prefill, _ = hf_logits(model, ids)
    runner = CliRunner()
    for engine in ("torch", "reference"):
        for mode in ("prefill", "decode"):
            out = tmp_path / f"{engine}-{mode}.npy"
            r = runner.invoke(app, ["logits", "--checkpoint", str(directory), "--tokens", ",".join(map(str, ids)),
                                    "--engine", engine, "--mode", mode, "--out", str(out)])
            assert r.exit_code == 0, r.output
            assert np.abs(np.load(out) - hf_prefill).max() <= TOL, (engine, mode)
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["layer_types"][0] = "sparse_attention"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["logits", "--checkpoint", str(bad), "--tokens", "1,2,3", "--out", str(tmp_path / "x.npy")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "layer_types[0]" in lines[0] and "Traceback" not in r.output


def test_cli_generate_on_init_checkpoint(tmp_path):
    from pocketllm.export.cli.main import app

    directory = init_checkpoint("minimax", "tiny", tmp_path / "tiny", seed=3, dtype="fp32")
    prompt = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
              "3 + 4 = 7 and the square root of 144 is 12.")
    from pocketllm.export.tokenizer import load_tokenizer

    assert len(load_tokenizer(directory, 1).encode(prompt)) > 32  # the prefill spans two lightning blocks
    runner = CliRunner()
    texts = []
    for engine in ("torch", "reference"):
        r = runner.invoke(app, ["generate", "--checkpoint", str(directory), "--prompt", prompt, "--greedy",
                                "--max-new-tokens", "12", "--engine", engine])
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith(prompt)
        texts.append(r.stdout.splitlines()[0])
    assert texts[0] == texts[1] and len(texts[0]) > len(prompt)
