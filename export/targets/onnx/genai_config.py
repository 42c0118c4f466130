"""`genai_config.json`: what onnxruntime-genai (0.18) reads to drive model.onnx (`og.Model(folder)`).

Keys as onnxruntime-genai's own model builder writes them (onnxruntime_genai/models/builders/base.py,
`make_genai_config`) and its C++ config parser reads them:

    model.type                   "decoder": genai's generic decoder-only model (input_ids -> logits + KV cache)
    model.context_length         KV positions the graph supports (our max_context; RoPE tables are that long)
    model.bos_token_id / eos_token_id / pad_token_id / vocab_size
    model.decoder.filename       "model.onnx" (external data is found by ORT next to it)
    model.decoder.head_size, hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers
                                 genai sizes its KV buffers from num_key_value_heads x head_size (per layer it
                                 re-reads the graph's input shapes) and finds the KV layers by matching the name
                                 templates against the graph inputs, so layers without a KV cache are simply absent
    model.decoder.inputs/outputs name templates (%d = layer index): past_key_names, past_value_names,
                                 present_key_names, present_value_names; past/present_recurrent_names for
                                 lightning states; input_ids, attention_mask, logits
    model.decoder.session_options  ORT session options; unknown keys become session config entries
    search.max_length            default generation limit (= context_length)
    search.past_present_share_buffer  false: past [1, Hkv, P, D] in, present [1, Hkv, P+T, D] out, genai moves
                                 present to past between steps. true would mean ONE buffer [1, Hkv, max_length, D]
                                 bound as both past and present, written in place at the current position (what
                                 com.microsoft::GroupQueryAttention does); standard ONNX ops cannot write in place.
    search.chunk_size            prompts longer than this are prefilled in chunks (bounds prefill memory)
    search.do_sample/top_k/top_p/temperature/num_beams/repetition_penalty  defaults: greedy
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pocketllm.export.errors import PocketllmError
from pocketllm.export.spec import ModelSpec

CONFIG_FILE = "genai_config.json"
MODEL_TYPE = "decoder"


def genai_config(spec: ModelSpec, options, report) -> dict[str, Any]:
    inputs: dict[str, str] = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    outputs: dict[str, str] = {"logits": "logits"}
    if report.kv_layers:
        inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
        outputs |= {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    if report.state_layers:  # lightning states; genai 0.18 also wants a conv state per such layer (placeholder)
        inputs |= {"past_recurrent_names": "past.%d.recurrent", "past_conv_names": "past.%d.conv"}
        outputs |= {"present_recurrent_names": "present.%d.recurrent", "present_conv_names": "present.%d.conv"}
    eos = list(spec.eos_token_ids)
    search: dict[str, Any] = {
        "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": options.max_context,
        "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
        "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    }
    if options.chunk:
        search["chunk_size"] = options.chunk
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else (eos[0] if eos else 0),
            "context_length": options.max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": eos[0] if eos else 0,
            "type": MODEL_TYPE,
            "vocab_size": spec.vocab_size,
        },
        "search": search,
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> Path:
    path = Path(folder) / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(json.dumps(config, indent=4) + "\n")
    os.replace(tmp, path)
    return path


def read_genai_config(folder: str | Path) -> dict[str, Any]:
    """The folder's genai_config.json, checked for the keys our runner reads. One-line PocketllmError otherwise."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise PocketllmError(f"{folder}: ONNX folder not found")
    if not path.is_file():
        raise PocketllmError(f"{path}: not found; an ONNX folder needs genai_config.json next to model.onnx "
                             "(re-export with `pocketllm export --target onnx`)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None
    try:
        decoder = config["model"]["decoder"]
        decoder["filename"], decoder["inputs"]["input_ids"], decoder["outputs"]["logits"]
    except (KeyError, TypeError) as e:
        raise PocketllmError(f"{path}: missing key model.decoder.{e.args[0] if e.args else '?'} "
                             "(expected onnxruntime-genai's decoder config)") from None
    return config
