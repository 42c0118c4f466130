"""One linear layer as single-layer `.pte` programs: exact any4 (pocketllm::any4_linear, LUT carried as bf16 as
`pocketllm export` writes it), W4A8 any4 (pocketllm::any4_linear_w4a8, same any4 weights) and XNNPACK 8da4w (torchao
int8-dynamic x int4). Decode (one token) by default; --tokens 128 for prefill. Writes JSON and prints a table.

    .venv/bin/python benchmarks/linear_speed_w4a8.py --threads 1,2 --out benchmarks/results/linear_speed_w4a8.json

Shapes (N out x K in): the MiniCPM4 0.5b linears q/o 1024x1024, gate/up 4096x1024, down 1024x4096; --head adds the
73448 x 1024 LM head (any4 / W4A8 vs 8da4w; slow to quantize). Every program is timed --iters calls per round, the
variants and thread counts interleaved round-robin (--rounds rounds); both the median and the minimum over rounds are
reported, and ratios use the minimum (the least-disturbed round: on a shared machine, other processes inflate
medians unevenly, more so for longer calls). Read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import copy
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

SHAPES = {"q_proj/o_proj": (1024, 1024), "gate/up_proj": (4096, 1024), "down_proj": (1024, 4096)}
HEAD = {"lm_head": (73448, 1024)}


def build_programs(n: int, k: int, group_size: int, tokens: int, tmp: Path) -> dict[str, Path]:
    import torch
    from torch import nn

    import pocketllm.export.ops.any4_linear_w4a8  # noqa: F401  (registers pocketllm::any4_linear_w4a8)
    from pocketllm.export.nn.quant_linear import Any4Linear
    from pocketllm.export.ops.any4_linear_w4a8 import w4a8_pack
    from pocketllm.export.quant import any4 as any4q
    from pocketllm.export.quant.format import TensorQuant
    from pocketllm.export.targets.executorch import lower as et

    class One(nn.Module):
        def __init__(self, lin: nn.Module):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    class W4A8(nn.Module):
        def __init__(self, packed: dict[str, torch.Tensor], g: int):
            super().__init__()
            self.g = g
            for name, t in packed.items():
                self.register_buffer(name, t)

        def forward(self, x):
            return torch.ops.pocketllm.any4_linear_w4a8(x, self.qweight, self.lut_i8, self.lut_scale, self.scales,
                                                        self.zeros, self.g)

    def lower(mod: nn.Module, path: Path) -> Path:
        ep = torch.export.export(mod, (torch.randn(1, tokens, k),), strict=False)
        path.write_bytes(et.lower(ep, {}).to_executorch().buffer)
        return path

    torch.manual_seed(n * 31 + k)
    lin = nn.Linear(k, n, bias=False).requires_grad_(False)
    out = {}
    m8 = One(copy.deepcopy(lin))
    et.quantize_torchao(m8, group_size)
    out["8da4w"] = lower(m8, tmp / f"8da4w_{n}x{k}.pte")
    a = Any4Linear(k, n, TensorQuant("any4", group_size))
    for name, value in any4q.quantize(lin.weight.float(), group_size).items():
        setattr(a, name, value)
    out["w4a8"] = lower(W4A8(w4a8_pack(a.qweight, a.lut, a.scales, a.zeros, group_size), group_size),
                        tmp / f"w4a8_{n}x{k}.pte")
    et.any4_luts_to_bf16(a)  # what `pocketllm export` does
    out["any4"] = lower(One(a), tmp / f"any4_{n}x{k}.pte")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, interleaved")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1, help="rows of x per call (1 = decode)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--head", action="store_true", help="also the 73448 x 1024 LM head")
    ap.add_argument("--only-head", action="store_true", help="only the LM head")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/linear_speed_w4a8.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from executorch.runtime import Runtime

    from pocketllm.runtime_py.runners.executorch import load_kernel_library, set_threads

    torch.set_num_threads(1)
    load_kernel_library(needed=["pocketllm::any4_linear.out", "pocketllm::any4_linear_w4a8.out"])
    thread_counts = [int(t) for t in args.threads.split(",")]
    rt = Runtime.get()
    shapes = HEAD if args.only_head else {**SHAPES, **(HEAD if args.head else {})}
    iters = args.iters if args.tokens == 1 else max(3, args.iters // 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (n, k) in shapes.items():
            programs = build_programs(n, k, args.group_size, args.tokens, Path(tmp))
            methods = {v: rt.load_program(str(p)).load_method("forward") for v, p in programs.items()}
            x = torch.randn(1, args.tokens, k)
            times: dict[tuple[int, str], list[float]] = {}
            for threads in thread_counts:
                set_threads(threads)
                for m in methods.values():
                    for _ in range(5):
                        m.execute([x])
            for _ in range(args.rounds):
                for threads in thread_counts:
                    set_threads(threads)
                    for v, m in methods.items():
                        t0 = time.perf_counter()
                        for _ in range(iters):
                            m.execute([x])
                        times.setdefault((threads, v), []).append((time.perf_counter() - t0) / iters)
            for threads in thread_counts:
                ms = {v: statistics.median(times[(threads, v)]) * 1e3 for v in methods}
                best = {v: min(times[(threads, v)]) * 1e3 for v in methods}
                row = {"layer": label, "N": n, "K": k, "threads": threads, "ms_median": ms, "ms_min": best,
                       "w4a8_vs_8da4w": best["8da4w"] / best["w4a8"], "w4a8_vs_any4": best["any4"] / best["w4a8"],
                       "any4_vs_8da4w": best["8da4w"] / best["any4"],
                       "w4a8_vs_8da4w_median": ms["8da4w"] / ms["w4a8"]}
                rows.append(row)
                print(f"{label:14} {n:5}x{k:<5} t={threads} "
                      + "  ".join(f"{v} {best[v]:.4f} ({ms[v]:.4f}) ms" for v in methods)
                      + f"  | w4a8 speed = {row['w4a8_vs_8da4w']:.2f}x 8da4w ({row['w4a8_vs_8da4w_median']:.2f}x by "
                      f"medians), {row['w4a8_vs_any4']:.2f}x any4", flush=True)
            del methods
    result = {"command": " ".join([".venv/bin/python benchmarks/linear_speed_w4a8.py", *sys.argv[1:]]),
              "tokens": args.tokens, "group_size": args.group_size, "iters": iters, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "note": "ms_min / ms_median: min / median over rounds of the mean call time in a round; variants and "
                      "thread counts interleaved; ratios (speed of w4a8 relative to the other) from ms_min",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
