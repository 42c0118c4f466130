"""`CoreMLEngine`: a bundle's `model.mlpackage` behind the engine protocol, driven the way an iOS app drives it.

    engine = CoreMLEngine("out/tiny-coreml", mode="fp16")
    logits = engine.forward(prompt_ids, 0)        # prefill function over padded chunks
    logits = engine.forward([next_id], len(ids))  # decode function, one token
    engine.reset()

What the package is called with comes from the manifest (`targets.coreml`, schema_version 2): the MIL function
names of `functions.prefill` / `functions.decode`, and per function the input with role "tokens", the input with
role "position" and the output with role "logits". `function_io` is the adapter: where the manifest leaves a role
out it picks the one input or output that fits (integer [1, T] tokens, integer [1] or [] position, the output whose
last dimension is the vocabulary) and refuses to guess between two.

Call pattern (an app's): at start_pos 0 the states are reset (a fresh `make_state()`; this restarts recurrent
states). Runs of two or more tokens go through the prefill function in chunks of its fixed token count, the last
chunk padded with `targets.coreml.pad_token_id` (default 0; pocketllm's packages use -1, which they know to be
padding); padded rows write cache rows past the prompt, which the causal mask hides and the next call overwrites.
When the entry says `pads_prefill: false` (recurrent lightning state, which padding would feed) a short tail runs
token by token instead. Single tokens go through the decode function. A chunk that would write past max_context
runs token by token through the decode function instead. Like the ExecuTorch runner, start_pos may rewind to any
cached position: rows from start_pos on are overwritten by the call (recurrent states cannot rewind; the manifest
of such a model must say so and callers restart at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.runners.coreml.interpreter import Interpreter
from pocketllm.runtime_py.runners.coreml.package import TensorType

INT_TYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")


@dataclass(frozen=True)
class FunctionIO:
    """How to call one function of the package: MIL function name, input/output names, fixed token count."""

    function: str
    tokens: str
    position: str
    logits: str
    num_tokens: int | None  # tokens per call (the most, for a flexible shape)
    flexible: bool  # the tokens input has a flexible length: no padding needed
    tokens_rank: int
    position_shape: tuple[int, ...]


def _by_role(entries: list[dict] | None, role: str) -> str | None:
    names = [e.get("name") for e in entries or [] if isinstance(e, dict) and e.get("role") == role]
    if len(names) > 1:
        raise PocketllmError(f"manifest: several entries have role '{role}' ({', '.join(map(str, names))})")
    return names[0] if names else None


def function_io(role: str, entry: dict[str, Any] | None, interpreter: Interpreter, vocab_size: int,
                where: str) -> FunctionIO:
    """The call description of the function playing `role` ("prefill" / "decode"), from its manifest entry."""
    entry = entry or {}
    name = entry.get("name") or (role if role in interpreter.functions else None)
    if name not in interpreter.functions:
        raise PocketllmError(f"{where}: functions.{role}.name {name!r} is not a function of the package "
                             f"(functions: {', '.join(interpreter.functions)})")
    fn = interpreter.package.functions[name]
    inputs = {n: t for n, t in fn.inputs if not t.state}
    outputs = {o: t for o in fn.outputs for op in fn.ops for n, t in op.outputs if n == o}
    tokens = _by_role(entry.get("inputs"), "tokens")
    position = _by_role(entry.get("inputs"), "position")
    logits = _by_role(entry.get("outputs"), "logits")

    ints = [n for n, t in inputs.items() if t.dtype in INT_TYPES]
    if position is None:
        found = [n for n in ints if n != tokens and len(inputs[n].shape) <= 1 and inputs[n].shape in ((), (1,))]
        position = _only(found, f"{where}: functions.{role}: which input is the position?")
    if tokens is None:
        found = [n for n in ints if n != position]
        tokens = _only(found, f"{where}: functions.{role}: which input holds the token ids?")
    if logits is None:
        found = list(outputs) if len(outputs) == 1 else [o for o, t in outputs.items() if t.shape[-1:] == (vocab_size,)]
        logits = _only(found, f"{where}: functions.{role}: which output holds the logits?")
    for kind, n, pool in (("input", tokens, inputs), ("input", position, inputs), ("output", logits, outputs)):
        if n not in pool:
            raise PocketllmError(f"{where}: functions.{role}: function '{name}' has no {kind} '{n}' "
                                 f"({kind}s: {', '.join(pool)})")
    t: TensorType = inputs[tokens]
    if not t.shape or t.dtype not in INT_TYPES:
        raise PocketllmError(f"{where}: functions.{role}: tokens input '{tokens}' is {t}, expected integer [1, T]")
    if outputs[logits].shape[-1:] not in ((vocab_size,), (None,)):
        raise PocketllmError(f"{where}: functions.{role}: logits output '{logits}' is {outputs[logits]}, expected "
                             f"[..., {vocab_size}]")
    pos_shape = tuple(d or 1 for d in inputs[position].shape)
    return FunctionIO(name, tokens, position, logits, t.shape[-1], t.shape[-1] is None, len(t.shape), pos_shape)


def _only(found: list[str], question: str) -> str:
    if len(found) != 1:
        raise PocketllmError(f"{question} (candidates: {', '.join(found) or 'none'}); give it a role in "
                             "manifest.json")
    return found[0]


class CoreMLEngine:
    """The Core ML package of a bundle, run by our MIL interpreter. mode: "fp16" (emulate fp16 rounding, what a
    phone computes) or "fp32" (the program's math in float32). manifest: the bundle's manifest dict, if already
    read (otherwise read and, with verify, checked against the files' sha256)."""

    def __init__(self, bundle: str | Path, mode: str = "fp16", verify: bool = True,
                 manifest: dict[str, Any] | None = None):
        self.bundle = Path(bundle)
        if manifest is None:
            from pocketllm.export.bundle.manifest import read_manifest

            manifest = read_manifest(self.bundle, verify=verify)
        where = f"{self.bundle}/manifest.json"
        target = manifest.get("targets", {}).get("coreml")
        if target is None:
            raise PocketllmError(f"{where}: the bundle has no Core ML target (targets: "
                                 f"{', '.join(manifest.get('targets', {})) or 'none'})")
        self.manifest, self.target = manifest, target
        self.max_context = int(manifest["model"]["max_context"])
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self.program = Interpreter(self.bundle / target["file"], mode=mode)
        for state in target.get("states", []):
            if state["name"] not in self.program.state_types:
                raise PocketllmError(f"{where}: targets.coreml.states names '{state['name']}', which the package "
                                     f"does not declare (states: {', '.join(self.program.state_types) or 'none'})")
        functions = target.get("functions") or {}
        roles = {r for r in ("prefill", "decode") if r in functions} or self._guess_roles()
        self.prefill = function_io("prefill", functions.get("prefill"), self.program, self.vocab_size,
                                   where) if "prefill" in roles else None
        self.decode = function_io("decode", functions.get("decode"), self.program, self.vocab_size,
                                  where) if "decode" in roles else None
        if self.decode is not None and self.decode.num_tokens not in (1, None):
            raise PocketllmError(f"{where}: the decode function takes {self.decode.num_tokens} tokens, expected 1")
        if self.prefill is not None and self.prefill.num_tokens is None:
            chunk = int(target.get("prefill_chunk") or 0)
            if chunk <= 0:
                raise PocketllmError(f"{where}: the prefill function has a flexible token count; "
                                     "targets.coreml.prefill_chunk must give the most tokens per call")
            self.prefill = FunctionIO(**{**self.prefill.__dict__, "num_tokens": chunk})
        self.pad_id = int(target.get("pad_token_id", 0))
        recurrent = "lightning" in manifest.get("attention", {}).get("per_layer", [])
        self.pads_prefill = bool(target.get("pads_prefill", not recurrent))
        self.length = 0

    def _guess_roles(self) -> set[str]:
        if len(self.program.functions) == 1:  # a single-function package: its token count says what it is
            (fn,) = self.program.package.functions.values()
            counts = [t.shape[-1] for _, t in fn.inputs if not t.state and t.dtype in INT_TYPES and t.shape]
            return {"decode"} if counts == [1] else {"prefill"}
        raise PocketllmError(f"{self.bundle}/manifest.json: targets.coreml.functions must name the prefill and "
                             f"decode functions (package functions: {', '.join(self.program.functions)})")

    # ------------------------------------------------------------------------------------------ protocol
    def forward(self, tokens, start_pos: int) -> np.ndarray:
        from pocketllm.runtime_py.decoder import check_tokens

        tokens, start_pos = check_tokens(tokens, start_pos, self.vocab_size, self.max_context)
        if start_pos > self.length:
            raise PocketllmError(f"forward: start_pos {start_pos} must be between 0 and the {self.length} cached "
                                 "tokens")
        if start_pos == 0:
            self.program.reset_states()
        outs, s = [], 0
        while s < tokens.size:
            pos, rest = start_pos + s, tokens.size - s
            chunk = self.prefill.num_tokens if self.prefill else 0
            fits = self.prefill is not None and pos + chunk <= self.max_context
            if fits and not self.pads_prefill and rest < chunk and self.decode is not None:
                fits = False  # a recurrent state would take in the padding: token by token
            if fits and (rest > 1 or self.decode is None):
                n = min(rest, chunk)
                outs.append(self._call(self.prefill, tokens[s:s + n], pos)[:n])
            elif self.decode is not None:
                n = 1
                outs.append(self._call(self.decode, tokens[s:s + 1], pos))
            else:
                raise PocketllmError(f"forward: a {chunk}-token prefill chunk at position {pos} does not fit in "
                                     f"max_context {self.max_context} and the package has no decode function")
            s += n
        self.length = start_pos + tokens.size
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def reset(self) -> None:
        self.length = 0
        self.program.reset_states()

    def _call(self, io: FunctionIO, tokens: np.ndarray, pos: int) -> np.ndarray:
        ids = np.full(tokens.size if io.flexible else io.num_tokens, self.pad_id, dtype=np.int64)
        ids[:tokens.size] = tokens
        feeds = {io.tokens: ids.reshape((1,) * (io.tokens_rank - 1) + (-1,)),
                 io.position: np.full(io.position_shape, pos, dtype=np.int64)}
        logits = self.program.run(io.function, feeds)[io.logits]
        return np.asarray(logits, dtype=np.float32).reshape(-1, self.vocab_size).copy()


__all__ = ["CoreMLEngine", "FunctionIO", "function_io"]
