"""One linear layer, three ways, as single-layer `.pte` programs: fp32 (XNNPACK), 8da4w (torchao int8-dynamic x
int4, XNNPACK) and any4 (our pocketllm::any4_linear kernel). Writes JSON and prints a table.

    .venv/bin/python benchmarks/linear_speed.py --threads 2 --out benchmarks/results/linear_speed.json

"any4" is what `pocketllm export` writes (LUT carried as bf16); "any4 (fp16 LUT)" the kernel's fp16-LUT path.
Shapes default to the MiniCPM4 0.5b linears (N out x K in): q/o 1024x1024, k/v 128x1024, gate/up 4096x1024,
down 1024x4096. Each program is run --iters times after a warm-up, interleaved round-robin over the variants
(--rounds rounds; the median round is reported) so that machine noise hits all of them alike. Times include
ExecuTorch's per-call overhead, as in a real model.
"""

from __future__ import annotations

import argparse
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

SHAPES = {"q_proj/o_proj": (1024, 1024), "k_proj/v_proj": (128, 1024), "gate/up_proj": (4096, 1024),
          "down_proj": (1024, 4096)}


def build_programs(n: int, k: int, group_size: int, tmp: Path) -> dict[str, Path]:
    import copy

    import torch
    from torch import nn

    from pocketllm.export.nn.quant_linear import Any4Linear
    from pocketllm.export.quant import any4 as any4q
    from pocketllm.export.quant.format import TensorQuant
    from pocketllm.export.targets.executorch import lower as et

    class One(nn.Module):
        def __init__(self, lin: nn.Module):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    def lower(mod: nn.Module, path: Path) -> Path:
        ep = torch.export.export(mod, (torch.randn(1, 1, k),), strict=False)
        path.write_bytes(et.lower(ep, {}).to_executorch().buffer)
        return path

    torch.manual_seed(n * 31 + k)
    lin = nn.Linear(k, n, bias=False).requires_grad_(False)
    out = {"fp32": lower(One(lin), tmp / f"fp32_{n}x{k}.pte")}
    m8 = One(copy.deepcopy(lin))
    et.quantize_torchao(m8, group_size)
    out["8da4w"] = lower(m8, tmp / f"8da4w_{n}x{k}.pte")
    a = Any4Linear(k, n, TensorQuant("any4", group_size))
    for name, value in any4q.quantize(lin.weight.float(), group_size).items():
        setattr(a, name, value)
    out["any4 (fp16 LUT)"] = lower(One(copy.deepcopy(a)), tmp / f"any4_fp16_{n}x{k}.pte")
    et.any4_luts_to_bf16(a)  # what `pocketllm export` does
    out["any4"] = lower(One(a), tmp / f"any4_{n}x{k}.pte")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/linear_speed.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from executorch.runtime import Runtime

    from pocketllm.runtime_py.runners.executorch import load_kernel_library, set_threads

    torch.set_num_threads(1)
    load_kernel_library(needed=["pocketllm::any4_linear.out"])
    set_threads(args.threads)
    rt = Runtime.get()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (n, k) in SHAPES.items():
            programs = build_programs(n, k, args.group_size, Path(tmp))
            methods = {v: rt.load_program(str(p)).load_method("forward") for v, p in programs.items()}
            x = torch.randn(1, 1, k)
            for m in methods.values():
                for _ in range(10):
                    m.execute([x])
            times: dict[str, list[float]] = {v: [] for v in methods}
            for _ in range(args.rounds):
                for v, m in methods.items():
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        m.execute([x])
                    times[v].append((time.perf_counter() - t0) / args.iters)
            ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
            row = {"layer": label, "N": n, "K": k, "ms": ms, "any4_vs_8da4w": ms["8da4w"] / ms["any4"],
                   "any4_vs_fp32": ms["fp32"] / ms["any4"]}
            rows.append(row)
            print(f"{label:14} {n:5}x{k:<5} " + "  ".join(f"{v} {t:.4f} ms" for v, t in ms.items())
                  + f"  any4 speed = {row['any4_vs_8da4w']:.2f}x 8da4w", flush=True)
    # per-token totals for the 0.5b model: 24 layers x (q, k, v, o, gate, up, down)
    per_layer = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}
    total = {v: sum(r["ms"][v] * per_layer[r["layer"]] for r in rows) * 24 for v in rows[0]["ms"]}
    result = {"command": " ".join([".venv/bin/python benchmarks/linear_speed.py", *sys.argv[1:]]),
              "threads": args.threads, "group_size": args.group_size, "iters": args.iters, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "model_0.5b_linears_ms_per_token": total,
              "model_0.5b_any4_vs_8da4w": total["8da4w"] / total["any4"]}
    print(f"0.5b linears per token: fp32 {total['fp32']:.1f} ms, 8da4w {total['8da4w']:.1f} ms, any4 "
          f"{total['any4']:.1f} ms -> any4 = {result['model_0.5b_any4_vs_8da4w']:.2f}x 8da4w speed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
