"""Run a bundle's `model.pte` through ExecuTorch's Python runtime (the engine behind `--engine executorch`).

Same engine protocol as the reference model: `forward(tokens int64 [T], start_pos) -> logits float32 [T, vocab]`
and `reset()`. The KV cache lives inside the program (mutable buffers); positions >= start_pos are overwritten by
the next call, and a call at start_pos 0 restarts lightning states, so `reset()` only forgets the position.

Custom ops (`pocketllm::*`) need our kernel library (kernels/, built by `make setup`). It is loaded once per process;
a second library registering the same op names would abort the process, so loading is guarded by the runtime's
operator registry.

A bundle exported with `--experts file` keeps its MoE experts in experts.bin, which the kernel library's expert store
reads (kernels/expert_store.h). The runner opens it with a budget: the `expert_cache_mb` argument, else
$POCKETLLM_EXPERT_CACHE_MB, else the manifest's `expert_store.cache_mb` (the export's --expert-cache-mb), else none
(memory-mapped, routed experts resident as used). 0 means no budget; MiB may be fractional.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

TARGET = "executorch"
KERNEL_LIBRARY_ENV = "POCKETLLM_KERNELS"
EXPERT_CACHE_ENV = "POCKETLLM_EXPERT_CACHE_MB"
EXPERT_PREFETCH_ENV = "POCKETLLM_EXPERT_PREFETCH"
EXPERT_STATS = ("hits", "prefetch_hits", "waits", "misses", "prefetch_loads", "evictions", "bytes_read",
                "resident_bytes", "peak_resident_bytes", "slots", "load_ns")  # kernels/expert_store.h
REPO = Path(__file__).resolve().parents[2]
DEFAULT_KERNEL_LIBRARY = REPO / "kernels" / "build" / "libpocketllm_kernels.so"
_loaded: dict[str, ctypes.CDLL] = {}


def kernel_library_path() -> Path:
    return Path(os.environ.get(KERNEL_LIBRARY_ENV) or DEFAULT_KERNEL_LIBRARY)


def registered_operators() -> set[str]:
    from executorch.extension.pybindings import portable_lib

    return set(portable_lib._get_operator_names())


def load_kernel_library(path: str | Path | None = None, needed: list[str] | tuple[str, ...] = ()) -> Path | None:
    """Make sure every op in `needed` (e.g. "pocketllm::infllm_attention.out") has an ExecuTorch kernel.

    Loads the library at `path` (default: $POCKETLLM_KERNELS or kernels/build/libpocketllm_kernels.so) unless every
    needed op is registered already. Never loads a library twice. Returns the path loaded, or None.
    """
    registered = registered_operators()
    missing = [op for op in needed if op not in registered]
    if needed and not missing:
        return None
    path = Path(path) if path else kernel_library_path()
    key = str(path.resolve()) if path.exists() else str(path)
    if key in _loaded:
        return path
    if not path.is_file():
        raise PocketllmError(f"kernel library {path} not found: the bundle needs {', '.join(missing) or 'pocketllm ops'}"
                             f"; build it with `make kernels` (or set {KERNEL_LIBRARY_ENV})")
    if any(op.startswith("pocketllm::") for op in registered):
        # Someone else (another copy of the library) registered our ops: loading ours too would abort.
        still = [op for op in missing if op.startswith("pocketllm::")]
        if still:
            raise PocketllmError(f"a different pocketllm kernel library is already loaded and lacks {still[0]}")
        return None
    _loaded[key] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    absent = [op for op in missing if op not in registered_operators()]
    if absent:
        raise PocketllmError(f"kernel library {path} does not register {absent[0]}; rebuild it with `make kernels`")
    return path


def kernel_library_handle(path: str | Path | None = None) -> ctypes.CDLL:
    """ctypes handle of the loaded kernel library (for its C entry points), loading it if nobody has."""
    path = Path(path) if path else kernel_library_path()
    if _loaded:
        return next(iter(_loaded.values()))
    try:  # loaded by someone else (e.g. a test's ctypes.CDLL): the same handle, no second registration
        return ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    load_kernel_library(path, ["pocketllm::expert_store_moe_ffn.out"])
    return next(iter(_loaded.values()))


class ExpertStore:
    """A bundle's experts.bin opened in the kernel library's expert store (registered under its id, which the
    program's expert_store_moe_ffn calls name). budget_mb 0 / None: no budget (memory-mapped)."""

    def __init__(self, path: Path, budget_mb: float | None, prefetch: bool = True, expected_id: str | None = None,
                 library: str | Path | None = None):
        self.lib = kernel_library_handle(library)
        self.path, self.budget_mb, self.prefetch = Path(path), float(budget_mb or 0), prefetch
        ident, err = ctypes.create_string_buffer(33), ctypes.create_string_buffer(512)
        budget = ctypes.c_int64(int(self.budget_mb * 2**20))
        ok = self.lib.pocketllm_expert_store_open(str(self.path).encode(), budget,
                                                  ctypes.c_int64(int(prefetch)), ident, err, ctypes.c_int64(512))
        if not ok:
            raise PocketllmError(err.value.decode(errors="replace"))
        self.id = ident.value.decode()
        if expected_id is not None and self.id != expected_id:
            raise PocketllmError(f"{self.path}: expert store {self.id}, but the manifest names {expected_id} "
                                 "(experts.bin from another export?)")

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_int64 * len(EXPERT_STATS))()
        if not self.lib.pocketllm_expert_store_stats(self.id.encode(), out):
            raise PocketllmError(f"expert store {self.id} is not open")
        return dict(zip(EXPERT_STATS, out))

    def drain(self) -> None:
        self.lib.pocketllm_expert_store_drain(self.id.encode())

    def last_error(self) -> str:
        err = ctypes.create_string_buffer(512)
        return err.value.decode(errors="replace") if self.lib.pocketllm_expert_store_last_error(err, 512) else ""


def expert_budget_mb(argument: float | None, manifest_entry: dict) -> float:
    """The expert store budget in MiB: the argument, else $POCKETLLM_EXPERT_CACHE_MB, else the manifest's."""
    if argument is not None:
        return float(argument)
    env = os.environ.get(EXPERT_CACHE_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise PocketllmError(f"${EXPERT_CACHE_ENV} must be a number of MiB, 0 for no budget (got {env!r})")
        return value
    return float(manifest_entry.get("cache_mb") or 0)


def load_llama_ops() -> None:
    """ExecuTorch's llama::update_cache / custom_sdpa kernels (shipped in the wheel)."""
    if "llama::custom_sdpa.out" in registered_operators():
        return
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def set_threads(threads: int | None) -> None:
    """Size ExecuTorch's threadpool (default: its own choice). Creating the pool logs ExecuTorch's CPU probing to
    stderr; those lines are filtered (export/noise.py)."""
    from executorch.extension.pybindings import portable_lib

    from pocketllm.export.noise import native_stderr_filtered

    with native_stderr_filtered():
        portable_lib._threadpool_get_thread_count()  # creates the pool
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))


class ExecutorchRunner:
    """The `.pte` of a bundle. threads: ExecuTorch threadpool size (XNNPACK and our kernels share it)."""

    def __init__(self, bundle: str | Path, verify: bool = True, threads: int | None = None,
                 kernel_library: str | Path | None = None, manifest: dict | None = None,
                 expert_cache_mb: float | None = None, expert_store_prefetch: bool | None = None):
        from pocketllm.export.bundle.manifest import read_manifest

        self.bundle = Path(bundle)
        self.manifest = manifest if manifest is not None else read_manifest(self.bundle, verify=verify)
        target = self.manifest.get("targets", {}).get("executorch")
        if target is None:
            raise PocketllmError(f"{self.bundle}: the bundle has no ExecuTorch target (manifest targets: "
                                 f"{', '.join(self.manifest.get('targets', {})) or 'none'})")
        self.target = target
        self.max_context = int(self.manifest["model"]["max_context"])
        self.chunk = int(target.get("prefill_chunk") or self.max_context)  # most tokens per forward call
        self.vocab_size = int(self.manifest["model"]["vocab_size"])
        ops = target.get("operators", [])
        if any(op.startswith("llama::") for op in ops):
            load_llama_ops()
        custom = target.get("requires_kernels", [])
        if custom:
            load_kernel_library(kernel_library, custom)
        self.experts = None
        store = target.get("expert_store")
        if store is not None:
            if expert_store_prefetch is None:
                expert_store_prefetch = os.environ.get(EXPERT_PREFETCH_ENV, "1") != "0"
            self.experts = ExpertStore(self.bundle / store["file"], expert_budget_mb(expert_cache_mb, store),
                                       expert_store_prefetch, store["id"], kernel_library)
        set_threads(threads)

        import torch
        from executorch.runtime import Runtime

        self.torch = torch
        runtime = Runtime.get()
        try:
            program = runtime.load_program(str(self.bundle / target["file"]))
            self.method = program.load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError with its own code
            raise PocketllmError(f"{self.bundle / target['file']}: ExecuTorch could not load forward ({e})") from None
        self.program = program
        self.length = 0

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise PocketllmError("forward: tokens must hold at least one id")
        if not 0 <= start_pos <= self.length:
            raise PocketllmError(f"forward: start_pos {start_pos} must be between 0 and the {self.length} cached tokens")
        if start_pos + tokens.size > self.max_context:
            raise PocketllmError(f"forward: {start_pos} cached + {tokens.size} new tokens exceed the bundle's "
                                 f"max_context {self.max_context}")
        outs = []
        for s in range(0, tokens.size, self.chunk):  # prompts longer than the program's T bound, in chunks
            t = self.torch.from_numpy(tokens[s:s + self.chunk].copy())[None]
            pos = self.torch.tensor([int(start_pos) + s], dtype=self.torch.long)
            try:
                with self._native_log() as native:
                    try:
                        logits = self.method.execute([t, pos])[0]
                    except RuntimeError as e:
                        why = self.experts.last_error() if self.experts is not None else ""
                        if why:  # the store's one line says it all: not ExecuTorch's trace of the failed call
                            native.drop_kernel_failure()
                        raise PocketllmError(why or f"{self.bundle / self.target['file']}: forward failed ({e})")
            except PocketllmError as e:
                raise PocketllmError(str(e)) from None
            outs.append(logits[0].numpy().astype(np.float32, copy=True))
        self.length = start_pos + tokens.size
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _native_log(self):
        """Around execute: with an expert store, fd 2 is filtered so that a damaged experts.bin reads as one line
        (export/noise.py); without one, nothing is redirected (no cost per call)."""
        from pocketllm.export.noise import NativeFilter, native_stderr_filtered

        return native_stderr_filtered() if self.experts is not None else contextlib.nullcontext(NativeFilter())

    def reset(self) -> None:
        self.length = 0

    def read_constant(self, name: str):
        return self.program.load_method(name).execute([])[0]


Runner = ExecutorchRunner
