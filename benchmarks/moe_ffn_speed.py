"""pocketllm::moe_ffn at SmallThinker 4b-a0.6b shapes (H 1536, F 768, E 32, k 4), one decode token (T = 1).

Part 1, single-layer `.pte` programs run by ExecuTorch (times include its per-call overhead, as in a model):
    moe_ffn fp32 / bf16 / any4       the op and our kernel: reads the 4 routed experts only
    all 32 experts fp32 / any4       today's export (export/nn/mlp.py): every expert runs, unselected ones weighted 0;
                                     fp32 linears on XNNPACK, any4 linears through pocketllm::any4_linear
    4 experts as linears fp32 / any4 the 4 routed experts as 12 separate linears (a static graph that knew them)
Part 2, the kernel alone through its C entry point, ReGLU neuron sparsity off / auto (what the `.out` kernels do:
skip while few enough neurons are active, see kernels/moe_ffn.h) / always, at the gate statistics of random weights
(~50% of gates positive) and with the routed experts' gate rows sign-flipped so that 25% / 10% are positive (what
trained ReLU-family FFNs show; SmallThinker's real statistics need the real checkpoint), plus the kernel with k = 32
(all experts routed: the same kernel reading the whole layer).

Each variant runs --iters calls per round after a warm-up, interleaved round-robin over the variants for --rounds
rounds (noise on a shared machine hits all alike); medians of the rounds are reported, per thread count, twice:
"warm" (the same experts call after call: what fits in the caches stays there; 4 any4 experts are 7.5 MB) and
"cold" (96 MiB read between calls, outside the timing: the weights come from DRAM, as in a model).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/moe_ffn_speed.py --threads 1 2 --out benchmarks/results/moe_ffn_speed.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H, F, E, K_ACTIVE, GROUP = 1536, 768, 32, 4, 128
SPARSITY = {"off": 0, "auto": 1, "always": 2}  # kernels/moe_ffn.h NeuronSparsity


def random_any4(E_: int, N: int, K: int, gen):
    """Stacked packed any4 tensors (values do not change the speed): bf16 LUT (what export writes), fp16 scales."""
    import torch

    G = K // GROUP
    return [torch.randint(0, 256, (E_, N, K // 2), dtype=torch.uint8, generator=gen),
            (torch.randn(E_, N, 16, generator=gen) * 4).to(torch.bfloat16),
            ((torch.rand(E_, N, G, generator=gen) + 0.5) * 0.25 * K ** -0.5).half(),
            (torch.randn(E_, N, G, generator=gen) * 0.1 * K ** -0.5).half()]


def experts(gen):
    import torch

    fp32 = [torch.randn(E, F, H, generator=gen) * s for s in (H ** -0.5, H ** -0.5, F ** -0.5)]  # gate, up, down_t
    any4 = random_any4(E, F, H, gen) + random_any4(E, F, H, gen) + random_any4(E, H, F, gen)
    return fp32, any4


def build_programs(fp32, any4, routed, tmp: Path) -> dict[str, tuple[Path, list]]:
    """label -> (.pte path, inputs). routed: the 4 expert ids of the measured token."""
    import torch
    from torch import nn

    import pocketllm.export.ops  # noqa: F401
    from pocketllm.export.nn.quant_linear import Any4Linear
    from pocketllm.export.quant.format import TensorQuant
    from pocketllm.export.targets.executorch import lower as et

    gate, up, down_t = fp32

    class Op(nn.Module):
        def __init__(self, tensors, any4_op: bool):
            super().__init__()
            self.n = len(tensors)
            for i, t in enumerate(tensors):
                self.register_buffer(f"w{i}", t)
            self.op = torch.ops.pocketllm.moe_ffn_any4 if any4_op else torch.ops.pocketllm.moe_ffn

        def forward(self, x, ids, w):
            return self.op(x, ids, w, *(getattr(self, f"w{i}") for i in range(self.n)), "reglu")

    def linear(e: int, proj: int):
        if proj == 2:
            lin = nn.Linear(F, H, bias=False)
            lin.weight.data = down_t[e].T.contiguous()
        else:
            lin = nn.Linear(H, F, bias=False)
            lin.weight.data = (gate, up)[proj][e].clone()
        return lin

    def any4_linear(e: int, proj: int):
        n, k = (H, F) if proj == 2 else (F, H)
        lin = Any4Linear(k, n, TensorQuant("any4", GROUP))
        q, lut, s, z = any4[4 * proj:4 * proj + 4]
        lin.qweight, lin.lut, lin.scales, lin.zeros = q[e].clone(), lut[e].clone(), s[e].clone(), z[e].clone()
        return lin

    class Experts(nn.Module):
        """out = sum_j w[:, j] * down_j(relu(gate_j x) * up_j x) over the given experts (export/nn/mlp.py's graph)."""

        def __init__(self, ids, make):
            super().__init__()
            self.gate = nn.ModuleList([make(e, 0) for e in ids])
            self.up = nn.ModuleList([make(e, 1) for e in ids])
            self.down = nn.ModuleList([make(e, 2) for e in ids])

        def forward(self, x, w):
            out = torch.zeros_like(x)
            for j, (g, u, d) in enumerate(zip(self.gate, self.up, self.down)):
                out = out + d(torch.relu(g(x)) * u(x)) * w[:, j:j + 1]
            return out

    def lower(mod, inputs, name):
        mod.eval().requires_grad_(False)
        ep = torch.export.export(mod, tuple(inputs), strict=False)
        path = tmp / f"{name}.pte"
        path.write_bytes(et.lower(ep, {}).to_executorch().buffer)
        return path

    x = torch.randn(1, H)
    ids = torch.tensor([routed])
    w = torch.full((1, K_ACTIVE), 1.0 / K_ACTIVE)
    dense_w = torch.zeros(1, E)
    dense_w[0, routed] = w[0]
    specs = {
        "moe_ffn fp32": (lambda: Op([gate, up, down_t], False), [x, ids, w]),
        "moe_ffn bf16": (lambda: Op([t.to(torch.bfloat16) for t in (gate, up, down_t)], False), [x, ids, w]),
        "moe_ffn any4": (lambda: Op(any4, True), [x, ids, w]),
        "4 experts as linears fp32": (lambda: Experts(routed, linear), [x, w]),
        "4 experts as linears any4": (lambda: Experts(routed, any4_linear), [x, w]),
        "all 32 experts fp32": (lambda: Experts(range(E), linear), [x, dense_w]),
        "all 32 experts any4": (lambda: Experts(range(E), any4_linear), [x, dense_w]),
    }
    out = {}
    for label, (make, inputs) in specs.items():
        t0 = time.perf_counter()
        out[label] = (lower(make(), inputs, label.replace(" ", "_")), inputs)
        print(f"built {label} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def interleaved(calls: dict, iters: int, rounds: int, flush=None) -> dict[str, dict[str, float]]:
    """Per variant: median over rounds of the mean wall time per call (ms) and of the calling thread's CPU time
    ("cpu_ms": with one thread all work runs on it, and CPU time does not count the time other processes hold the
    core: the steadier number on a shared machine). Variants interleaved round-robin; flush (cold) runs before every
    call, outside the timed region."""
    for f in calls.values():
        for _ in range(3):
            f()
    wall: dict[str, list[float]] = {v: [] for v in calls}
    cpu: dict[str, list[float]] = {v: [] for v in calls}
    for _ in range(rounds):
        for v, f in calls.items():
            tw = tc = 0.0
            for _ in range(iters):
                if flush is not None:
                    flush()
                w0, c0 = time.perf_counter(), time.thread_time()
                f()
                tc += time.thread_time() - c0
                tw += time.perf_counter() - w0
            wall[v].append(tw / iters)
            cpu[v].append(tc / iters)
    return {v: {"ms": statistics.median(wall[v]) * 1e3, "cpu_ms": statistics.median(cpu[v]) * 1e3} for v in calls}


def show(title: str, ms: dict, threads: int) -> None:
    print(f"\n{title}")
    for v, t in ms.items():
        extra = f"   cpu {t['cpu_ms']:8.3f}" if threads == 1 else ""
        print(f"  {v:28} {t['ms']:8.3f}{extra}")


def cache_flush():
    """Reads 96 MiB (3x the L3 of the machine this was written on), evicting the experts' weights: "cold" is a
    model's case, where 32 layers' experts pass through the caches between two uses of one layer."""
    import numpy as np

    scratch = np.ones(96 << 18, dtype=np.float32)
    return lambda: float(scratch.sum())


def flip_to_active_fraction(fp32, any4, x, routed, fraction: float, gen):
    """Copies of the experts whose routed experts' gate rows are negated so that exactly `fraction` of the gates of
    token x are positive (negating a row flips its gate's sign; any4: negate LUT and zeros, exact)."""
    import torch

    from pocketllm.export.ops.any4_linear import any4_dequantize

    gate = fp32[0].clone()
    lut, zeros = any4[1].clone(), any4[3].clone()
    n_active = round(fraction * F)
    for e in routed:
        want = torch.zeros(F, dtype=torch.bool)
        want[torch.randperm(F, generator=gen)[:n_active]] = True
        flip = (gate[e] @ x > 0) != want
        gate[e, flip] = -gate[e, flip]
        g4 = any4_dequantize(any4[0][e], any4[1][e], any4[2][e], any4[3][e], GROUP) @ x
        flip4 = (g4 > 0) != want
        lut[e, flip4] = -lut[e, flip4]
        zeros[e, flip4] = -zeros[e, flip4]
    return [gate, *fp32[1:]], [any4[0], lut, any4[2], zeros, *any4[4:]]


def kernel_calls(lib, fp32, any4, x, routed) -> dict:
    """label -> (sparsity mode: off / auto / always) -> zero-argument call of the C entry point."""
    import torch

    I = ctypes.c_int64

    def p(t):
        return ctypes.c_void_p(t.data_ptr())

    out = torch.empty(1, H)
    ids = torch.tensor([routed])
    w = torch.full((1, K_ACTIVE), 1.0 / K_ACTIVE)
    bf16 = [t.to(torch.bfloat16) for t in fp32]

    def dense(mats, is_bf16, ids_, w_):
        args = [p(x), p(ids_), p(w_), I(1), I(ids_.shape[1]), I(H), *map(p, mats), I(is_bf16), I(E), I(F), I(0)]
        return lambda mode: (lambda: lib.pocketllm_moe_ffn(*args, I(SPARSITY[mode]), p(out)))

    def quant(ids_, w_):
        a = [p(t) for t in any4]
        args = [p(x), p(ids_), p(w_), I(1), I(ids_.shape[1]), I(H), *a[0:4], I(H // GROUP), *a[4:8], I(H // GROUP),
                *a[8:12], I(F // GROUP), I(1), I(1), I(E), I(F), I(0)]
        return lambda mode: (lambda: lib.pocketllm_moe_ffn_any4(*args, I(SPARSITY[mode]), p(out)))

    all_ids = torch.arange(E).reshape(1, E)  # every expert
    all_w = torch.full((1, E), 1.0 / E)
    keep = [ids, w, all_ids, all_w, bf16, out]  # referenced by the closures' raw pointers
    calls = {"fp32": dense(fp32, 0, ids, w), "bf16": dense(bf16, 1, ids, w), "any4": quant(ids, w),
             "fp32 k=32": dense(fp32, 0, all_ids, all_w), "bf16 k=32": dense(bf16, 1, all_ids, all_w),
             "any4 k=32": quant(all_ids, all_w)}
    calls["_keep"] = keep
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-pte", action="store_true", help="only part 2 (the kernel through ctypes)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/moe_ffn_speed.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from executorch.runtime import Runtime

    from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY, load_kernel_library, set_threads

    torch.set_num_threads(1)
    load_kernel_library(needed=["pocketllm::moe_ffn.out", "pocketllm::any4_linear.out"])
    lib = ctypes.CDLL(str(DEFAULT_KERNEL_LIBRARY))
    gen = torch.Generator().manual_seed(0)
    fp32, any4 = experts(gen)
    routed = sorted(torch.randperm(E, generator=gen)[:K_ACTIVE].tolist())
    x = torch.randn(1, H, generator=gen)
    result = {"command": " ".join(["PYTHONPATH=$PWD .venv/bin/python benchmarks/moe_ffn_speed.py", *sys.argv[1:]]),
              "shapes": {"hidden": H, "ffn": F, "experts": E, "top_k": K_ACTIVE, "any4_group": GROUP, "tokens": 1},
              "routed_experts": routed, "iters": args.iters, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "pte_ms": {}, "kernel_ms": {}}

    flush = cache_flush()
    modes = {"warm": None, "cold": flush}
    if not args.skip_pte:
        rt = Runtime.get()
        with tempfile.TemporaryDirectory() as tmp:
            programs = build_programs(fp32, any4, routed, Path(tmp))
            for n in args.threads:
                # XNNPACK delegates keep the threadpool they were loaded with: reset it first, then load
                set_threads(n)
                methods = {v: (rt.load_program(str(p)).load_method("forward"), inp) for v, (p, inp) in programs.items()}
                calls = {v: (lambda m=m, inp=inp: m.execute(inp)) for v, (m, inp) in methods.items()}
                for mode, fl in modes.items():
                    ms = interleaved(calls, args.iters, args.rounds, fl)
                    result["pte_ms"].setdefault(str(n), {})[mode] = ms
                    show(f".pte, {n} thread(s), {mode} caches, ms per call (median of {args.rounds} rounds x "
                         f"{args.iters}):", ms, n)
                del methods, calls

    fractions = {"random": None, "25%": 0.25, "10%": 0.10}
    for label, frac in fractions.items():
        f32, a4 = (fp32, any4) if frac is None else flip_to_active_fraction(fp32, any4, x[0], routed, frac, gen)
        if frac is None:
            g = torch.stack([f32[0][e] @ x[0] for e in routed])
            label = f"random ({(g > 0).float().mean().item():.0%})"
        calls = kernel_calls(lib, f32, a4, x, routed)
        keep = calls.pop("_keep")
        variants = {}
        for name, make in calls.items():
            if "k=32" in name and frac is not None:
                continue
            for mode in SPARSITY:
                variants[f"{name} {mode}"] = make(mode)
        for n in args.threads:
            set_threads(n)
            for mode, fl in modes.items():
                ms = interleaved(variants, args.iters, args.rounds, fl)
                result["kernel_ms"].setdefault(str(n), {}).setdefault(mode, {})[label] = ms
                show(f"kernel (ctypes), {n} thread(s), {mode} caches, positive gates {label}:", ms, n)
        del keep
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
