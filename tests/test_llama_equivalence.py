"""MiniCPM4 dense is Llama plus muP scalars: folding them into the weights gives transformers' LlamaForCausalLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.cli.engines import make_engine
from pocketllm.runtime_py.evaluate import run_logits
from tests.conftest import edit_config

transformers = pytest.importorskip("transformers")


def folded_llama(ckpt, rope_parameters):
    """LlamaForCausalLM with embed * scale_emb, o/down * scale_depth/sqrt(L), lm_head * dim_model_base/hidden."""
    spec = ckpt.spec
    config = transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters=rope_parameters, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(config).eval()
    weights = dict(ckpt.iter_tensors(dtype=torch.float32))
    state = {}
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            w = w * spec.scale_emb
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w = w * spec.residual_scale
        state[name] = w
    state["lm_head.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]) * spec.logit_scale
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("longrope", [False, True])
def test_minicpm4_dense_equals_folded_llama(tiny_copy, longrope):
    d = tiny_copy("minicpm4_dense")
    if longrope:
        rope = open_checkpoint(d).config["rope_scaling"]
        params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": rope["short_factor"],
                  "long_factor": rope["long_factor"],
                  "original_max_position_embeddings": rope["original_max_position_embeddings"]}
        # transformers' Llama switches to the long list once the sequence passes the original 1024 positions;
        # MiniCPM4 (max_pos 2048 > 1024) always uses it: they agree on a prompt longer than 1024.
        n = 1100
    else:
        edit_config(d, rope_scaling=None)
        params = {"rope_type": "default", "rope_theta": 10000.0}
        n = 300
    ckpt = open_checkpoint(d)
    llama = folded_llama(ckpt, params)
    ids = np.random.default_rng(0).integers(3, ckpt.spec.vocab_size, size=n)
    with torch.no_grad():
        expected = llama(torch.as_tensor(ids)[None]).logits[0].float().numpy()
    ours = run_logits(make_engine("torch", ckpt, n, "fp32"), ids.tolist(), "prefill")
    assert np.abs(ours - expected).max() <= 1e-4
    reference = run_logits(make_engine("reference", ckpt, n), ids.tolist(), "prefill")
    assert np.abs(reference - expected).max() <= 1e-4
