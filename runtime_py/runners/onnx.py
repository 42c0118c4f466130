"""Run a bundle's ONNX folder (`BUNDLE/onnx/`: model.onnx + genai_config.json) through onnxruntime.

Engine protocol (runtime_py/generate.py): `forward(tokens int64 [T], start_pos) -> logits float32 [T, vocab]` and
`reset()`. The graph keeps no state: this engine holds the past key/values ([1, Hkv, P, D] per softmax layer) and
the lightning states ([1, H, D, D]) as numpy arrays and feeds them back, exactly as onnxruntime-genai does. Names
come from genai_config.json's templates matched against the session's inputs, never hard-coded.

start_pos may rewind the KV cache (rows after it are dropped); a model with lightning layers can only restart
(start_pos 0) or continue (start_pos = cached length), like the reference. Prompts longer than genai's
`search.chunk_size` are run in chunks of that size, as genai does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

TARGET = "onnx"


def onnx_folder(path: str | Path, manifest: dict | None = None, verify: bool = True) -> Path:
    """A bundle directory (its manifest names targets.onnx; read and verified unless given) or the ONNX folder
    itself (a folder with genai_config.json and no manifest.json)."""
    path = Path(path)
    if manifest is None and (path / "manifest.json").is_file():
        from pocketllm.export.bundle.manifest import read_manifest

        manifest = read_manifest(path, verify=verify)
    if manifest is None:
        return path
    target = manifest.get("targets", {}).get(TARGET)
    if target is None:
        raise PocketllmError(f"{path}: the bundle has no ONNX target (manifest targets: "
                             f"{', '.join(manifest.get('targets', {})) or 'none'}); re-export with --target onnx")
    return path / target.get("dir", "onnx")


def _layers(names: list[str], template: str | None) -> list[int]:
    if not template:
        return []
    pattern = re.compile("^" + re.escape(template).replace("%d", r"(\d+)") + "$")
    return sorted(int(m.group(1)) for n in names if (m := pattern.match(n)))


class OnnxEngine:
    """path: a bundle or its onnx/ folder. threads: ORT intra-op threads (None: ORT's default). session_config:
    extra ORT session config entries."""

    def __init__(self, path: str | Path, threads: int | None = None, session_config: dict[str, str] | None = None,
                 manifest: dict | None = None, verify: bool = True):
        import onnxruntime as ort

        from pocketllm.export.targets.onnx.genai_config import read_genai_config

        self.folder = onnx_folder(path, manifest, verify)
        self.config = read_genai_config(self.folder)
        decoder = self.config["model"]["decoder"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        for key, value in {**decoder.get("session_options", {}), **(session_config or {})}.items():
            if key not in ("log_id", "provider_options") and isinstance(value, str):
                so.add_session_config_entry(key, value)
        model_path = self.folder / decoder["filename"]
        if not model_path.is_file():
            raise PocketllmError(f"{model_path}: not found (genai_config.json names it as model.decoder.filename)")
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise PocketllmError(f"{model_path}: onnxruntime could not load it ({str(e).splitlines()[0]})") from None
        names = [i.name for i in self.session.get_inputs()]
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        ins, outs = decoder["inputs"], decoder["outputs"]
        self.input_ids, self.attention_mask, self.logits = ins["input_ids"], ins.get("attention_mask"), outs["logits"]
        self.kv_layers = _layers(names, ins.get("past_key_names"))
        self.state_layers = _layers(names, ins.get("past_recurrent_names"))
        self.kv_io = [(ins["past_key_names"] % i, ins["past_value_names"] % i, outs["present_key_names"] % i,
                       outs["present_value_names"] % i) for i in self.kv_layers]
        self.state_io = [(ins["past_recurrent_names"] % i, outs["present_recurrent_names"] % i)
                         for i in self.state_layers]
        if ins.get("past_conv_names"):  # genai's conv-state slots (placeholders for lightning layers)
            self.state_io += [(ins["past_conv_names"] % i, outs["present_conv_names"] % i)
                              for i in _layers(names, ins["past_conv_names"])]
        self.kv_shape = {i: (1, decoder["num_key_value_heads"], 0, decoder["head_size"]) for i in self.kv_layers}
        self.state_shape = {n: tuple(shapes[n]) for n, _ in self.state_io}
        self.output_names = [self.logits] + [n for io in self.kv_io for n in io[2:]] + [o for _, o in self.state_io]
        self.max_context = int(self.config["model"]["context_length"])
        self.chunk = int(self.config.get("search", {}).get("chunk_size") or 0)
        self.vocab_size = int(self.config["model"]["vocab_size"])
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self.past: dict[str, np.ndarray] = {}
        for i, (pk, pv, _, _) in zip(self.kv_layers, self.kv_io):
            self.past[pk] = np.zeros(self.kv_shape[i], dtype=np.float32)
            self.past[pv] = np.zeros(self.kv_shape[i], dtype=np.float32)
        for p, _ in self.state_io:
            self.past[p] = np.zeros(self.state_shape[p], dtype=np.float32)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise PocketllmError("forward: tokens must hold at least one id")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise PocketllmError(f"forward: token ids must lie in [0, {self.vocab_size})")
        if not 0 <= start_pos <= self.length:
            raise PocketllmError(f"forward: start_pos {start_pos} must be between 0 and the {self.length} cached tokens")
        if start_pos + tokens.size > self.max_context:
            raise PocketllmError(f"forward: {start_pos} cached + {tokens.size} new tokens exceed the model's "
                                 f"context_length {self.max_context}")
        if start_pos == 0:
            self.reset()
        elif start_pos < self.length:
            if self.state_io:
                raise PocketllmError(f"forward: start_pos {start_pos} must be 0 or {self.length}: lightning layers "
                                     "keep a running state that cannot rewind")
            for pk, pv, _, _ in self.kv_io:
                self.past[pk] = self.past[pk][:, :, :start_pos]
                self.past[pv] = self.past[pv][:, :, :start_pos]
        step = self.chunk or tokens.size
        outs = [self._run(tokens[s:s + step], start_pos + s) for s in range(0, tokens.size, step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _run(self, tokens: np.ndarray, start: int) -> np.ndarray:
        feed = {self.input_ids: tokens[None]}
        if self.attention_mask:
            feed[self.attention_mask] = np.ones((1, start + tokens.size), dtype=np.int64)
        feed.update(self.past)
        results = self.session.run(self.output_names, feed)
        it = iter(results[1:])
        for pk, pv, _, _ in self.kv_io:
            self.past[pk], self.past[pv] = next(it), next(it)
        for p, _ in self.state_io:
            self.past[p] = next(it)
        self.length = start + tokens.size
        return results[0][0].astype(np.float32, copy=False)


Runner = OnnxEngine
