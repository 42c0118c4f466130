"""Issue #9: pocketllm behaves as the models' own upstream code on every config. One section per item of the issue;
each test states the upstream rule (formula in its name or docstring) and says what pocketllm did before (commit
bb9c3ce), where the test fails.

Upstream sources the rules and key lists below are written from:
- MiniCPM4 remote code (openbmb/MiniCPM4-0.5B): `configuration_minicpm.py` (MiniCPMConfig) and `modeling_minicpm.py`
  (MiniCPMLongRoPE, MiniCPMAttention: head_dim = hidden_size // num_heads); the released `config.json`.
- SmallThinker remote code (PowerInfer/SmallThinker-4BA0.6B-Instruct): `configuration_smallthinker.py`
  (SmallThinkerConfig) and `modeling_smallthinker.py` (SmallThinkerModel.forward reads
  `config.output_router_logits`, which the config class does not set); the released `config.json`.
- transformers `models/minimax/configuration_minimax.py` (MiniMaxConfig), installed with the dev dependencies.
The acceptance checkpoint shaped like the released MiniCPM4-0.5B (load, generate, export, parity, ExecuTorch's
TextLLMRunner on its tokenizer.model) is tests/test_released_minicpm4.py.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import families, preset_config, spec_from_config
from pocketllm.export.nn.rope import RotaryTable
from pocketllm.runtime_py import ReferenceModel
from pocketllm.runtime_py.rope import rope_tables
from tests.conftest import edit_config

runner = CliRunner()

# ------------------------------------------------------------------------------------------------ upstream facts
# openbmb/MiniCPM4-0.5B config.json, as released.
RELEASED_LONGROPE = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297]
RELEASED_0_5B_CONFIG = {
    "_name_or_path": "openbmb/MiniCPM4-0.5B",
    "architectures": ["MiniCPMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                 "AutoModel": "modeling_minicpm.MiniCPMModel",
                 "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
                 "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
                 "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification"},
    "bos_token_id": 1,
    "eos_token_id": [2, 73440],
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.1,
    "intermediate_size": 4096,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"rope_type": "longrope", "long_factor": RELEASED_LONGROPE, "short_factor": RELEASED_LONGROPE,
                     "original_max_position_embeddings": 32768},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "vocab_size": 73448,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
}
# MiniCPMConfig.__init__ (configuration_minicpm.py): every key it reads, with its default.
MINICPM_CONFIG_KEYS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None, "bos_token_id": 1,
    "eos_token_id": 2, "pretraining_tp": 1, "tie_word_embeddings": True, "rope_theta": 10000.0, "rope_scaling": None,
    "attention_bias": False, "attention_dropout": 0.0, "scale_emb": 1, "dim_model_base": 1, "scale_depth": 1,
    "mup_denominator": None, "sparse_config": None,
}
# Keys modeling_minicpm.py reads from the config object (besides PretrainedConfig's own).
MINICPM_MODELING_READS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "pretraining_tp", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
    "scale_emb", "dim_model_base", "scale_depth", "sparse_config"}
# SmallThinkerConfig.__init__ (configuration_smallthinker.py), with its defaults.
SMALLTHINKER_CONFIG_KEYS = {
    "model_type": "smallthinker", "model_name": "smallthinker_4b_base", "num_hidden_layers": 32, "hidden_size": 1536,
    "pad_token_id": None, "bos_token_id": 151643, "eos_token_id": [151643, 151645], "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128, "use_cache": True,
    "rope_layout": [1] * 32, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
    "sliding_window_layout": [0] * 32, "sliding_window_size": 4096, "moe_num_primary_experts": 32,
    "moe_ffn_hidden_size": 768, "moe_primary_router_apply_softmax": False, "moe_num_active_primary_experts": 4,
    "tie_word_embeddings": True, "initializer_range": 0.02,
}
# Read by modeling_smallthinker.py although SmallThinkerConfig (and PretrainedConfig) never set them.
SMALLTHINKER_MODELING_ONLY = {"output_router_logits"}
# transformers' MiniMaxConfig.__init__ model keys (keyword-only; the PretrainedConfig ones are left out).
MINIMAX_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "sliding_window",
    "attention_dropout", "num_experts_per_tok", "num_local_experts", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "rope_parameters", "layer_types", "block_size", "full_attn_alpha_factor",
    "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor", "mlp_alpha_factor",
    "mlp_beta_factor")


def upstream_longrope_tables(config: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n, head_dim] as modeling_minicpm.py's MiniCPMLongRoPE builds them, in fp32 torch: the table is built
    once at seq_len = max_position_embeddings, so

        ext = long_factor if max_position_embeddings > original_max_position_embeddings else short_factor
        inv_freq = 1 / theta^(arange(0, d, 2) / d)
        freqs = outer(t, 1 / ext) * inv_freq;  emb = cat(freqs, freqs)
        cos, sin = cos(emb) * s, sin(emb) * s,   s = sqrt(1 + ln(max_pos / original) / ln(original))  (no clamp)

    Rows do not depend on the table length, so the first n rows are computed."""
    d = config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    rs, max_pos = config["rope_scaling"], config["max_position_embeddings"]
    orig = rs["original_max_position_embeddings"]
    ext = torch.tensor(rs["long_factor"] if max_pos > orig else rs["short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    t = torch.arange(n, dtype=torch.float32)
    freqs = torch.mul(torch.outer(t, 1.0 / ext), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    s = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    return (emb.cos() * s).numpy(), (emb.sin() * s).numpy()


def minicpm_longrope(max_pos: int, orig: int) -> dict:
    """The tiny MiniCPM4 preset, dense, with LongRoPE lists that differ (long = 1.25 x short)."""
    cfg = preset_config("minicpm4", "tiny")
    cfg.pop("sparse_config")
    cfg["max_position_embeddings"] = max_pos
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=orig)
    assert cfg["rope_scaling"]["long_factor"] != cfg["rope_scaling"]["short_factor"]
    return cfg


def our_tables(config: dict, max_context: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cos, sin) of both our engines: the numpy reference and the torch model."""
    spec = spec_from_config(config)
    rotary = RotaryTable(spec.rope, max_context)
    return [rope_tables(spec.rope, max_context), (rotary.cos.numpy(), rotary.sin.numpy())]


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("max_context", [16, 1024, 2048])
def test_item1_longrope_list_is_long_factor_iff_max_position_embeddings_gt_original__whatever_the_cache_size(
        max_context):
    """Upstream: ext = long_factor if max_position_embeddings > original_max_position_embeddings else short_factor,
    decided once from the config (the table is built at max_position_embeddings). max_pos 2048 > original 1024:
    the long list for every cache size. Before: RopeSpec.factors(max_context) took the short list for any cache
    <= 1024 (logits off by 1.45 through `pocketllm logits`, whose cache was the token count)."""
    cfg = minicpm_longrope(2048, 1024)
    n = min(max_context, 64)
    cos_up, sin_up = upstream_longrope_tables(cfg, n)
    for cos, sin in our_tables(cfg, max_context):
        np.testing.assert_allclose(cos[:n], cos_up, atol=2e-6, rtol=0)
        np.testing.assert_allclose(sin[:n], sin_up, atol=2e-6, rtol=0)
    short = minicpm_longrope(1024, 1024)  # max_pos == original: the short list, whatever the cache
    cos_up, _ = upstream_longrope_tables(short, n)
    for cos, _ in our_tables(short, max_context):
        np.testing.assert_allclose(cos[:n], cos_up, atol=2e-6, rtol=0)


def test_item1_logits_do_not_depend_on_the_cache_size_with_longrope_max_pos_gt_original(tiny_copy):
    """Same rule end to end: a LongRoPE checkpoint with max_pos 2048 > original 1024 gives the same logits with a
    16-position cache as with a 2048-position one, in the numpy reference and the torch model. Before: a cache of
    at most 1024 switched to the short list."""
    from pocketllm.export.nn import load_model

    d = tiny_copy("minicpm4_dense")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 2048 and cfg["rope_scaling"]["original_max_position_embeddings"] == 1024
    ids = np.array([1, 17, 80, 3, 250, 41, 9, 300], dtype=np.int64)
    small = ReferenceModel.from_checkpoint(d, max_context=16).forward(ids, 0)
    large = ReferenceModel.from_checkpoint(d, max_context=2048).forward(ids, 0)
    np.testing.assert_array_equal(small, large)
    with torch.no_grad():
        t_small = load_model(d, max_context=16, dtype="fp32")[0](torch.as_tensor(ids)[None], 0)[0].numpy()
        t_large = load_model(d, max_context=2048, dtype="fp32")[0](torch.as_tensor(ids)[None], 0)[0].numpy()
    np.testing.assert_array_equal(t_small, t_large)
    np.testing.assert_allclose(t_small, small, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("max_pos,orig", [(512, 1024), (1024, 1024), (2048, 1024)])
def test_item2_longrope_magnitude_is_sqrt_1_plus_ln_max_over_original_over_ln_original_unclamped(max_pos, orig):
    """Upstream multiplies cos and sin by s = sqrt(1 + ln(max_position_embeddings / original) / ln(original)) with no
    clamp: s = sqrt(0.9) = 0.9487 for 512 / 1024, 1 for 1024 / 1024, sqrt(1.1) for 2048 / 1024. Before: 1.0 whenever
    max_pos <= original (0.24 off in logits)."""
    cfg = minicpm_longrope(max_pos, orig)
    s = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    assert spec_from_config(cfg).rope.attention_scaling == pytest.approx(s, rel=1e-15)
    cos_up, sin_up = upstream_longrope_tables(cfg, 64)
    for cos, sin in our_tables(cfg, 64):
        assert cos[0, 0] == pytest.approx(s, rel=1e-6)  # angle 0: cos = s
        np.testing.assert_allclose(cos, cos_up, atol=2e-6, rtol=0)
        np.testing.assert_allclose(sin, sin_up, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ item 3
def test_item3_minicpm_head_dim_is_hidden_size_over_heads_and_a_head_dim_key_that_disagrees_is_an_error():
    """Upstream: MiniCPMAttention uses head_dim = hidden_size // num_attention_heads and never reads `head_dim`. A
    config whose head_dim agrees (64 / 4 = 16) is read as usual; one that disagrees is one error line naming both
    values. Before: head_dim 24 was honoured, silently a different model."""
    cfg = dict(preset_config("minicpm4", "tiny"), rope_scaling=None)  # plain RoPE: any even head_dim would do
    assert spec_from_config(dict(cfg, head_dim=16)).head_dim == 16
    with pytest.raises(PocketllmError) as e:
        spec_from_config(dict(cfg, head_dim=24))
    msg = str(e.value)
    assert "'head_dim'" in msg and "hidden_size / num_attention_heads = 16" in msg and "24" in msg
    assert "\n" not in msg


def test_item3_a_disagreeing_head_dim_is_one_line_from_the_cli(tiny_copy, tmp_path):
    """The same rule through a command: exit code 2 and one line naming head_dim, 16 and 24, before any weight is
    read. Before: head_dim 24 got as far as a tensor-shape mismatch."""
    d = edit_config(tiny_copy("minicpm4_dense"), head_dim=24, rope_scaling=None)
    r = runner.invoke(app, ["logits", "--checkpoint", str(d), "--tokens", "1,2,3", "--out", str(tmp_path / "l.npy")])
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert "'head_dim'" in line and "hidden_size / num_attention_heads = 16" in line and "24" in line


# ------------------------------------------------------------------------------------------------ item 4
def test_item4_minicpm_muP_keys_default_to_upstreams_1():
    """Upstream's MiniCPMConfig: scale_emb = dim_model_base = scale_depth = 1 when absent, so embeddings are scaled by
    1, residual branches by 1 / sqrt(num_hidden_layers) and the final hidden state divided by hidden_size / 1.
    Absent keys read exactly like the keys at those defaults. Before: the three keys were required (error)."""
    full = preset_config("minicpm4", "tiny")
    absent = {k: v for k, v in full.items() if k not in ("scale_emb", "scale_depth", "dim_model_base")}
    spec = spec_from_config(absent)
    assert spec == spec_from_config(dict(absent, scale_emb=1, scale_depth=1, dim_model_base=1))
    assert spec.scale_emb == 1 and spec.residual_scale == pytest.approx(1 / math.sqrt(full["num_hidden_layers"]))
    assert spec.logit_scale == pytest.approx(1 / full["hidden_size"])


def test_item4_every_optional_key_defaults_as_upstreams_config_class():
    """Each key upstream's config class defaults, absent, reads as that default: MiniCPM rope_theta 10000,
    rms_norm_eps 1e-6, tie_word_embeddings true, bos 1, max_position_embeddings 2048; SmallThinker rope_theta 1e6 (not
    the released 1.5e6), tie_word_embeddings true, bos 151643, eos [151643, 151645]. Before: MiniCPM's
    max_position_embeddings was required (error), SmallThinker's rope_theta defaulted to 1.5e6 and its bos/eos to
    none."""
    for family, preset, defaults in (("minicpm4", "tiny", MINICPM_CONFIG_KEYS),
                                     ("smallthinker", "tiny", SMALLTHINKER_CONFIG_KEYS)):
        full = preset_config(family, preset)
        keys = {"minicpm4": ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                             "max_position_embeddings"),
                "smallthinker": ("rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                 "rms_norm_eps")}[family]
        for key in keys:
            absent = {k: v for k, v in full.items() if k != key}
            assert spec_from_config(absent) == spec_from_config(dict(absent, **{key: defaults[key]})), (family, key)
    assert spec_from_config({k: v for k, v in preset_config("smallthinker", "tiny").items()
                             if k != "rope_theta"}).rope.theta == 1e6


# ------------------------------------------------------------------------------------------------ item 5
def written_configs() -> list[tuple[str, str, dict]]:
    """Every config.json the project writes: every preset of every registered family."""
    return [(f.name, p, f.presets[p]()) for f in families().values() for p in f.presets]


def upstream_attributes(defaults: dict, config: dict) -> dict:
    """What a transformers config class holds after `Config(**config)`: its __init__ defaults, overridden by the
    file's keys (unknown keys become attributes too, as PretrainedConfig does with **kwargs)."""
    return {**defaults, **config}


@pytest.mark.parametrize("family,preset,config", written_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_item5_every_written_config_carries_every_key_upstream_reads_and_loads_as_upstream_does(family, preset,
                                                                                                 config):
    """Every key upstream's config class reads is in the file, and upstream's loading works:
    - MiniCPM4 (MiniCPMConfig, every key defaulted): every key is written except those the released MiniCPM4-0.5B
      config.json itself leaves to the class default; the released-like presets carry exactly the released keys.
    - SmallThinker: every SmallThinkerConfig key plus `output_router_logits`, read by modeling_smallthinker.py's
      forward and set by no config class (without it upstream's forward raises AttributeError); the class's
      asserts hold (heads % kv_heads == 0, one rope_layout and sliding_window_layout entry per layer).
    - MiniMax: every MiniMaxConfig key; transformers' own MiniMaxConfig(**config) holds every value as written.
    And pocketllm reads the file exactly as it reads the attributes upstream's class holds (our defaults are its).
    Before: `init-checkpoint --arch smallthinker` wrote no output_router_logits (upstream: AttributeError), nor
    model_name, pad_token_id, use_cache; MiniCPM4 and MiniMax configs had no use_cache."""
    if family == "minicpm4":
        allowed_absent = set(MINICPM_CONFIG_KEYS) - set(RELEASED_0_5B_CONFIG)
        missing = set(MINICPM_CONFIG_KEYS) - set(config) - allowed_absent
        assert not missing, f"{family} {preset}: config.json lacks {sorted(missing)}"
        if "model_type" not in config:  # shaped like the released config
            assert set(config) == set(RELEASED_0_5B_CONFIG)
        attrs = upstream_attributes(MINICPM_CONFIG_KEYS, config)
        assert MINICPM_MODELING_READS <= set(attrs)
        if attrs["rope_scaling"] is not None:
            assert {"rope_type", "short_factor", "long_factor", "original_max_position_embeddings"} <= \
                set(attrs["rope_scaling"])
        assert spec_from_config(attrs) == spec_from_config(config)
    elif family == "smallthinker":
        missing = (set(SMALLTHINKER_CONFIG_KEYS) | SMALLTHINKER_MODELING_ONLY) - set(config)
        assert not missing, f"{family} {preset}: config.json lacks {sorted(missing)}"
        attrs = upstream_attributes(SMALLTHINKER_CONFIG_KEYS, config)
        n = attrs["num_hidden_layers"]
        assert attrs["num_attention_heads"] % attrs["num_key_value_heads"] == 0
        assert len(attrs["rope_layout"]) == n and len(attrs["sliding_window_layout"]) == n
        assert spec_from_config(attrs) == spec_from_config(config)
    elif family == "minimax":
        from transformers import MiniMaxConfig

        missing = set(MINIMAX_CONFIG_KEYS) - set(config)
        assert not missing, f"{family} {preset}: config.json lacks {sorted(missing)}"
        loaded = MiniMaxConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
        for key in MINIMAX_CONFIG_KEYS:
            got = getattr(loaded, key)
            want = config[key]
            if key == "rope_parameters":  # transformers may add keys; ours must be there as written
                assert {k: got[k] for k in want} == want
            else:
                assert got == want, key
    else:
        pytest.fail(f"family {family}: add upstream's config keys to this test")


# ------------------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("preset", ["tiny", "21b-a3b"])
def test_item6_smallthinker_layers_l_mod_4_eq_0_are_nope_global_the_others_rope_sliding_window(preset):
    """Upstream (and llama.cpp): layer l with l % 4 == 0 is NoPE with global attention; every other layer is RoPE with
    the sliding window. Before: the presets gave the NoPE layers the window and the RoPE layers global attention."""
    cfg = preset_config("smallthinker", preset)
    spec = spec_from_config(cfg)
    for i, layer in enumerate(spec.layers):
        if i % 4 == 0:
            assert not layer.use_rope and layer.sliding_window is None and layer.attention == "dense", i
        else:
            assert layer.use_rope and layer.sliding_window == cfg["sliding_window_size"], i
            assert layer.attention == "sliding", i
        assert cfg["rope_layout"][i] == cfg["sliding_window_layout"][i] == int(i % 4 != 0)


def test_item6_smallthinker_4b_a0_6b_preset_is_the_released_config():
    """The released SmallThinker-4BA0.6B-Instruct config.json: tie_word_embeddings true, RoPE on every layer, no
    sliding window, rope_theta 1.5e6, model_name smallthinker_4b_instruct. Before: tie_word_embeddings false."""
    cfg = preset_config("smallthinker", "4b-a0.6b")
    assert cfg["tie_word_embeddings"] is True and cfg["model_name"] == "smallthinker_4b_instruct"
    assert cfg["rope_layout"] == [1] * 32 and cfg["sliding_window_layout"] == [0] * 32
    spec = spec_from_config(cfg)
    assert spec.tie_word_embeddings and spec.rope.theta == 1.5e6
    assert all(layer.use_rope and layer.sliding_window is None for layer in spec.layers)


# ------------------------------------------------------------------------------------------------ item 7
# InfLLM v2 scores, upstream's rule p_h[j] = exp(q . Kc1[j] / sqrt(d) - LSE_h(q . Kc2 / sqrt(d))) by default, the
# exact softmax over Kc1 kept as an option. Tests (tests/ops/test_infllm_attention.py):
#   test_upstream_scores_are_exp_q_kc1_minus_lse_of_q_kc2_and_pick_other_blocks_than_the_exact_softmax
#   test_the_score_rule_is_ours_not_a_config_key
#   test_vectorised_selection_equals_a_per_query_reading_of_the_doc (both rules)
#   test_infllm_block_scores_are_bit_identical_in_all_three_engines (C++ kernel, torch op, numpy reference:
#     bit-identical scores on long random contexts, decode and prefill chunks, GQA groups of 2, 8 and 16)
#   test_selected_blocks_match_reference_exactly, test_the_score_rules_select_differently_on_random_data
# and below: the rule reaches bundles (export option, manifest, parity).
def test_item7_default_score_rule_is_upstreams_lse_over_coarse_keys_kernel_4x():
    """Upstream's stage-1 normaliser LSE_h is taken over coarse compressed keys Kc2 of kernel 4 * 32 = 128 and stride
    4 * 16 = 64; that rule is the default for every config. Before: the exact softmax over Kc1 (no score_rule)."""
    sparse = spec_from_config(preset_config("minicpm4", "8b")).sparse
    assert sparse.score_rule == "upstream"
    assert (sparse.coarse_kernel_size, sparse.coarse_kernel_stride) == (128, 64)


def test_item7_export_option_sets_the_rule_in_the_plan_and_refuses_models_without_infllm(tiny_dirs, tmp_path):
    """`export --infllm-scores upstream|exact` sets SparseSpec.score_rule of the exported spec (upstream when not
    given); on a model without InfLLM v2 it is refused (it would be ignored); a bad name is one line. Before: no
    such option (and no export pipeline module)."""
    from pocketllm.export.pipeline import ExportRequest, plan

    ckpt = tiny_dirs["minicpm4_sparse"]
    assert plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "a")).spec.sparse.score_rule == "upstream"
    exact = plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "b", infllm_scores="exact")).spec
    assert exact.sparse.score_rule == "exact"
    with pytest.raises(PocketllmError, match="--infllm-scores must be one of upstream, exact"):
        plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "c", infllm_scores="softmax"))
    with pytest.raises(PocketllmError, match="--infllm-scores applies to InfLLM v2"):
        plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "d", infllm_scores="exact"))


def test_item7_parity_runs_the_reference_with_the_manifests_score_rule(tiny_dirs):
    """The rule is not a config key, so the bundle's reference/config.json cannot carry it: parity reads
    manifest attention.infllm_v2.score_rule and passes it to the numpy reference. Before: no score rule anywhere
    (runtime_py had no parity module: parity lived in the CLI)."""
    from pocketllm.runtime_py.parity import manifest_score_rule, reference_for

    manifest = {"attention": {"infllm_v2": {"score_rule": "exact"}}}
    assert manifest_score_rule(manifest) == "exact"
    assert manifest_score_rule({"attention": {}}) is None
    with pytest.raises(PocketllmError, match="re-export"):
        manifest_score_rule({"attention": {"infllm_v2": {"block_size": 64}}})
    ref, _ = reference_for(None, manifest, tiny_dirs["minicpm4_sparse"], 64)
    assert ref.spec.sparse.score_rule == "exact"


@pytest.mark.slow
def test_item7_an_exact_scores_bundle_records_its_rule_and_passes_parity_on_it(tmp_path):
    """End to end: `export --infllm-scores exact` builds the exact rule into the .pte (C++ kernel), records it in the
    manifest, and parity (reference on the exact rule too) passes with InfLLM v2 dropping blocks."""
    from tests.test_executorch_export import MAX_CONTEXT, configs, make_checkpoint
    from tests.kernels import build_kernels

    build_kernels()
    ckpt = make_checkpoint(tmp_path / "ckpt", configs()["minicpm4_infllm"], seed=11)
    out = tmp_path / "exact"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "executorch", "--max-context",
                            str(MAX_CONTEXT), "--infllm-scores", "exact", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention"]["infllm_v2"]["score_rule"] == "exact"
    assert manifest["spec"]["sparse"]["score_rule"] == "exact"
    assert "score_rule" not in json.loads((out / "reference" / "config.json").read_text())["sparse_config"]
    r = runner.invoke(app, ["parity", str(out), "--steps", "32"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "parity.json").read_text())["executorch"]
    assert report["passed"] and report["infllm_engaged"]


# ------------------------------------------------------------------------------------------------ item 8
def test_item8_the_released_minicpm4_0_5b_config_reads_as_upstream_reads_it():
    """The released MiniCPM4-0.5B config.json (no model_type, no rope_theta, no tie_word_embeddings, no sparse_config,
    rms_norm_eps 1e-5, LongRoPE original = max) reads as MiniCPMConfig fills it in: family from `architectures`,
    rope_theta 10000, tied embeddings, head_dim 1024 / 16 = 64, dense attention, the short list (max == original),
    magnitude sqrt(1 + ln(1) / ln(32768)) = 1, muP 12 / 1.4 / sqrt(24) / (256 / 1024). Before: "unknown model_type
    None"."""
    spec = spec_from_config(json.loads(json.dumps(RELEASED_0_5B_CONFIG)))
    assert spec.family == "minicpm4" and spec.head_dim == 64 and spec.tie_word_embeddings
    assert spec.rope.theta == 10000.0 and spec.rms_norm_eps == 1e-5 and spec.sparse is None
    assert spec.rope.factors == tuple(RELEASED_LONGROPE) and spec.rope.attention_scaling == 1.0
    assert spec.scale_emb == 12 and spec.residual_scale == pytest.approx(1.4 / math.sqrt(24))
    assert spec.logit_scale == pytest.approx(256 / 1024)
    assert spec.bos_token_id == 1 and spec.eos_token_ids == (2, 73440)
    assert all(layer.attention == "dense" and layer.use_rope for layer in spec.layers)


def test_item8_the_0_5b_preset_is_the_released_config():
    """`init-checkpoint --preset 0.5b` writes the released config.json, key for key and value for value (its
    torch_dtype follows --dtype). Before: a model_type, a head_dim, a rope_theta, no LongRoPE, rms_norm_eps 1e-6 and
    an InfLLM v2 sparse_config the released model does not have."""
    assert preset_config("minicpm4", "0.5b") == RELEASED_0_5B_CONFIG


# ------------------------------------------------------------------------------------------------ item 9
def test_item9_a_checkpoint_with_only_a_sentencepiece_tokenizer_model_loads(tiny_copy):
    """Upstream ships MiniCPM4 with a SentencePiece tokenizer.model (+ added_tokens.json); a checkpoint without
    tokenizer.json loads, encodes with BOS first (add_bos_token) and splits added tokens out of the text as
    upstream's tokenizer class does. Before: "tokenizer not found (pocketllm reads Hugging Face tokenizer.json)"."""
    from pocketllm.export.tokenizer import load_tokenizer

    d = tiny_copy("minicpm4_dense")
    (d / "tokenizer.json").unlink()
    tok = load_tokenizer(d, 1)
    added = json.loads((d / "added_tokens.json").read_text())
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and tok.decode(ids) == "Hello world"
    chat = tok.encode_plain("<|im_start|>user\nHi<|im_end|>")
    assert chat[0] == added["<|im_start|>"] and chat[-1] == added["<|im_end|>"]
    assert tok.decode(chat) == "user\nHi"  # added tokens are special: skipped when decoding
    r = runner.invoke(app, ["generate", "--checkpoint", str(d), "--prompt", "Hello", "--greedy",
                            "--max-new-tokens", "4", "--engine", "reference"])
    assert r.exit_code == 0, r.output


def test_item9_init_checkpoint_writes_minicpm4_a_sentencepiece_model_whose_eos_ids_are_its_eos_tokens(tmp_path):
    """MiniCPM4 checkpoints as upstream ships them: SentencePiece tokenizer.model (<unk> 0, <s> 1, </s> 2) with the
    8 added tokens at the end of the vocabulary (added_tokens.json), so the released-like EOS [2, vocab - 8] are
    </s> and <|im_end|> (73440 for the 0.5b preset: tests/test_released_minicpm4.py). Before: a byte-level BPE
    tokenizer.json whose ids past its learned tokens were no token at all."""
    import sentencepiece as spm

    from pocketllm.export.families.minicpm4.presets import released_like
    from pocketllm.export.init_checkpoint import write_random_tokenizer

    cfg = released_like(vocab_size=608, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    write_random_tokenizer(tmp_path, spec_from_config(cfg))
    assert {"tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"} <= \
        {p.name for p in tmp_path.iterdir()}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert sp.get_piece_size() == 600 and [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert added["<|im_end|>"] == 600 and sorted(added.values()) == list(range(600, 608))
    eos = {i: (sp.id_to_piece(i) if i < 600 else next(t for t, j in added.items() if j == i))
           for i in cfg["eos_token_id"]}
    assert eos == {2: "</s>", 600: "<|im_end|>"}


def test_item9_init_checkpoint_writes_smallthinker_qwen2_style_bpe_files_with_specials_at_the_config_ids(tmp_path):
    """SmallThinker ships Qwen2's byte-level BPE (vocab.json + merges.txt + tokenizer.json) with <|endoftext|>,
    <|im_start|>, <|im_end|> where the config's bos/eos ids put them (tiny preset: bos 0, eos [0, 2]; released:
    151643 / [151643, 151645], checked in tests/test_released_minicpm4.py's slow test). Before: tokenizer.json
    only."""
    from pocketllm.export.init_checkpoint import init_checkpoint
    from pocketllm.export.tokenizer import load_tokenizer

    d = init_checkpoint("smallthinker", "tiny", tmp_path / "st", seed=0, dtype="fp32")
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    cfg = json.loads((d / "config.json").read_text())
    tok = load_tokenizer(d, cfg["bos_token_id"]).backend
    assert tok.id_to_token(cfg["bos_token_id"]) == "<|endoftext|>"
    assert [tok.id_to_token(i) for i in cfg["eos_token_id"]] == ["<|endoftext|>", "<|im_end|>"]


# ------------------------------------------------------------------------------------------------ CLI defaults
def captured_contexts(monkeypatch) -> list[int]:
    """The cache sizes the torch and reference engines get built with, whichever command builds them."""
    import pocketllm.export.nn

    seen: list[int] = []
    load_model, from_checkpoint = pocketllm.export.nn.load_model, ReferenceModel.from_checkpoint

    def load(ckpt, max_context=None, dtype=None):
        seen.append(max_context)
        return load_model(ckpt, max_context=max_context, dtype=dtype)

    def reference(path, max_context=None, **kwargs):
        seen.append(max_context)
        return from_checkpoint(path, max_context=max_context, **kwargs)

    monkeypatch.setattr(pocketllm.export.nn, "load_model", load)
    monkeypatch.setattr(ReferenceModel, "from_checkpoint", reference)
    return seen


@pytest.mark.parametrize("engine", ["torch", "reference"])
def test_logits_default_cache_is_min_max_pos_4096_and_longrope_logits_do_not_depend_on_it(tiny_dirs, tmp_path,
                                                                                          monkeypatch, engine):
    """`pocketllm logits` without --max-context builds its cache at min(max_position_embeddings, 4096), as its help
    says, and for a LongRoPE config with max_pos 2048 > original 1024 the logits are identical with --max-context 16,
    2048 or none. Before: the cache defaulted to the token count, which chose the short list (off by 1.45)."""
    seen = captured_contexts(monkeypatch)
    d = tiny_dirs["minicpm4_dense"]
    out = {}
    for ctx in (None, 16, 2048):
        path = tmp_path / f"l{ctx}.npy"
        args = ["logits", "--checkpoint", str(d), "--tokens", "1,17,80,3,250,41,9,300", "--engine", engine,
                "--out", str(path)] + ([] if ctx is None else ["--max-context", str(ctx)])
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        out[ctx] = np.load(path)
    np.testing.assert_array_equal(out[None], out[16])
    np.testing.assert_array_equal(out[None], out[2048])
    assert seen == [min(2048, 4096), 16, 2048]


def test_generate_default_cache_is_min_max_pos_4096_for_checkpoints_and_the_bundles_for_bundles(tiny_dirs, monkeypatch):
    """`pocketllm generate` without --max-context: min(max_position_embeddings, 4096) on a checkpoint; a bundle's
    cache is the one it was exported with (manifest model.max_context). Before: min(max_pos, max(need, 256))."""
    seen = captured_contexts(monkeypatch)
    r = runner.invoke(app, ["generate", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--prompt", "Hello",
                            "--greedy", "--max-new-tokens", "2", "--engine", "reference"])
    assert r.exit_code == 0, r.output
    assert seen == [2048]
    # a bundle: BundleSource's max_position_embeddings is the manifest's max_context
    from pocketllm.export.cli import generate as generate_cmd
    from pocketllm.export.cli.engines import BundleSource

    source = BundleSource(tiny_dirs["minicpm4_dense"], {
        "model": {"vocab_size": 512, "max_context": 8192}, "architecture": "minicpm4",
        "tokenizer": {"bos_id": 1, "eos_ids": [2]}})
    monkeypatch.setattr(generate_cmd, "open_source", lambda *args, **kwargs: source)

    def no_engine(name, src, max_context=None, dtype=None):
        seen.append(max_context)
        raise PocketllmError("no engine needed")

    monkeypatch.setattr(generate_cmd, "make_engine", no_engine)
    r = runner.invoke(app, ["generate", "--bundle", str(tiny_dirs["minicpm4_dense"]), "--prompt", "Hello",
                            "--greedy", "--max-new-tokens", "2", "--engine", "executorch"])
    assert "no engine needed" in r.output and seen[-1] == 8192
