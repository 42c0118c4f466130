"""Where a bundle's decode step spends its time: ExecuTorch's ETDump per operator call, aggregated per kind of work.

    .venv/bin/python benchmarks/profile_decode.py --bundle any4=out/b/any4 --bundle w4a8=out/b/w4a8 \
        --threads 2 --context 0 --steps 32 --out benchmarks/results/profile_decode_0.5b

Each bundle's .pte is loaded with event tracing on (`_load_for_executorch(..., enable_etdump=True)`), our kernel
library and ExecuTorch's llama ops registered, then: the first --context cache positions filled with random tokens
in calls of the bundle's prefill chunk (unless --no-fill: then they are never written and read as the kernel's
shared zero page, cache-resident, which makes long-context attention look ~1.7x cheaper than after a real prefill:
9 vs ~15 ms per 16K step of the 0.5B), one prefill call of --prefill tokens at position --context, one warm-up decode
call, and --steps decode calls after it. The ETDump's events of the decode calls are read with
ExecuTorch's Inspector; every operator call (a portable/optimized aten kernel, a llama:: or pocketllm:: kernel, or an
XNNPACK delegate call = one partition) is timed by the runtime itself. Reported per decode step (medians over the
steps): the method's wall time, the sum of operator calls, the gap between the two (the interpreter: instruction
dispatch, tensor resizes, memory planning), and the time and count per group:

    any4 / w4a8 / int8 linear   pocketllm::any4_linear, any4_linear_w4a8, int8_linear (decoder layers and LM head)
    attention                   pocketllm::infllm_attention, llama::custom_sdpa
    kv cache                    llama::update_cache
    norm / rope / swiglu        pocketllm::rms_norm, rope, silu_mul (fused bundles: executorch.elementwise)
    xnnpack                     XNNPACK delegate calls (RMSNorm, RoPE, SiLU, residual adds, fp32 linears, ...)
    portable                    everything else on portable kernels (embedding gather, copies, views, indexing)

A per-operator table (name, calls per step, ms per step) and the JSON go to --out STEM.{json,md}. Event tracing adds a
little overhead per operator call; compare bundles with the same tool, and use benchmarks/decode_speed.py for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def group_of(name: str) -> str:
    n = name.lower()
    if n.startswith("xnnpack partition"):
        return "xnnpack"
    if "any4_linear_w4a8" in n:
        return "w4a8 linear"
    if "any4_linear" in n:
        return "any4 linear"
    if "int8_linear" in n:
        return "int8 linear (head)"
    if "infllm" in n or "custom_sdpa" in n or "sdpa" in n:
        return "attention"
    if "update_cache" in n:
        return "kv cache"
    if any(op in n for op in ("pocketllm::rms_norm", "pocketllm::rope", "pocketllm::silu_mul")):
        return "norm / rope / swiglu"
    if "delegate" in n or "xnnpack" in n:
        return "xnnpack"
    return "portable"


def profile_bundle(bundle: Path, threads: int, context: int, prefill: int, steps: int, fill: bool = True) -> dict:
    import numpy as np
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from pocketllm.export.bundle.manifest import read_manifest
    from pocketllm.runtime_py.runners.executorch import load_kernel_library, load_llama_ops, set_threads

    manifest = read_manifest(bundle, verify=False)
    entry = manifest["targets"]["executorch"]
    load_llama_ops()
    load_kernel_library(needed=entry.get("requires_kernels", []))
    set_threads(threads)
    module = portable_lib._load_for_executorch(str(bundle / entry["file"]), enable_etdump=True)
    vocab = manifest["model"]["vocab_size"]
    rng = np.random.default_rng(0)

    def call(tokens, start):
        t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        t0 = time.perf_counter()
        module.run_method("forward", (t, torch.tensor([start], dtype=torch.long)))
        return time.perf_counter() - t0

    chunk = entry.get("prefill_chunk") or manifest["model"]["prefill_chunk"]
    fill_calls = 0
    if fill:
        for start in range(0, context, chunk):
            call(rng.integers(3, vocab, size=min(chunk, context - start)), start)
            fill_calls += 1
    call(rng.integers(3, vocab, size=prefill), context)
    call([5], context + prefill)
    walls = [call([int(rng.integers(3, vocab))], context + prefill + 1 + i) for i in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    # The Inspector merges the runs: one "Execute" block whose events hold one duration per run in perf_data.raw
    # (the fill calls, then the prefill, the warm-up, and the decode steps). Per instruction: one outer event
    # (OPERATOR_CALL, or DELEGATE_CALL for an XNNPACK partition) whose duration is the call's; a kernel's own event
    # (native_call_<op>, pocketllm::<op>.out, ...) nested in it names it; XNNPACK's per-operator events
    # (is_delegated_op) are nested in the DELEGATE_CALL and reported apart.
    block = next(b for b in inspector.event_blocks if b.name.startswith("Execute"))
    first = fill_calls + 2
    outer: dict[int, tuple[str, list[float]]] = {}
    names: dict[int, str] = {}
    inside: dict[str, list[float]] = defaultdict(lambda: [0.0] * steps)
    method = None
    for ev in block.events:
        if not ev.perf_data:
            continue
        raw = [float(v) for v in ev.perf_data.raw][first:first + steps]
        if len(raw) < steps:
            continue
        if ev.name == "Method::execute":
            method = statistics.median(raw)
        elif ev.is_delegated_op:
            acc = inside[ev.name.split(" #")[0]]
            for i, v in enumerate(raw):
                acc[i] += v
        elif ev.name in ("OPERATOR_CALL", "DELEGATE_CALL"):
            outer[ev._instruction_id] = (ev.name, raw)
        else:
            names.setdefault(ev._instruction_id, ev.name)
    per_step: dict[str, list[float]] = defaultdict(lambda: [0.0] * steps)
    best: dict[str, float] = defaultdict(float)  # each call's least-disturbed step, summed
    calls_per_step: dict[str, int] = defaultdict(int)
    for iid, (kind, raw) in outer.items():
        name = "XNNPACK partition (DELEGATE_CALL)" if kind == "DELEGATE_CALL" else \
            names.get(iid, "unnamed operator call (prim / sym ops)")
        acc = per_step[name]
        for i, v in enumerate(raw):
            acc[i] += v
        best[name] += min(raw)
        calls_per_step[name] += 1
    per_op = per_step
    ops_ms = [sum(v[i] for v in per_step.values()) for i in range(steps)]
    inside_xnnpack = {k: v for k, v in inside.items()}
    ops = [{"name": k, "group": group_of(k), "calls_per_step": calls_per_step[k],
            "ms_per_step": statistics.median(v), "ms_per_step_best": best[k]} for k, v in per_op.items()]
    ops.sort(key=lambda o: -o["ms_per_step"])
    groups: dict[str, dict] = {}
    for o in ops:
        g = groups.setdefault(o["group"], {"ms_per_step": 0.0, "ms_per_step_best": 0.0, "calls_per_step": 0})
        g["ms_per_step"] += o["ms_per_step"]
        g["ms_per_step_best"] += o["ms_per_step_best"]
        g["calls_per_step"] += o["calls_per_step"]
    method = method if method is not None else 1000 * statistics.median(walls)
    op_sum = statistics.median(ops_ms)
    return {"bundle": bundle.name, "quantization": manifest.get("quantization"),
            "pte_mib": round(entry["size"] / 2**20, 1), "context": context, "context_filled": fill and context > 0,
            "steps": steps,
            "wall_ms_per_step": 1000 * statistics.median(walls), "method_ms_per_step": method,
            "operators_ms_per_step": op_sum, "operators_ms_per_step_best": sum(best.values()),
            "interpreter_gap_ms_per_step": (method - op_sum) if method is not None else None,
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["ms_per_step"])), "operators": ops,
            "inside_xnnpack_ms_per_step": dict(sorted(((k, statistics.median(v)) for k, v in inside_xnnpack.items()),
                                                      key=lambda kv: -kv[1]))}


def markdown(results: dict) -> str:
    lines = []
    for name, r in results["bundles"].items():
        lines.append(f"### {name} ({r['pte_mib']} MiB .pte), decode at context {r['context']}, "
                     f"{results['threads']} threads: {r['wall_ms_per_step']:.2f} ms per step wall, "
                     f"{r['method_ms_per_step']:.2f} ms in Method::execute, interpreter gap "
                     f"{r['interpreter_gap_ms_per_step']:.2f} ms\n")
        lines.append(f"Operators: {r['operators_ms_per_step']:.2f} ms per step (median), "
                     f"{r['operators_ms_per_step_best']:.2f} ms (sum of each call's best step)\n")
        lines.append("| group | ms / step (median) | ms / step (best) | calls / step |")
        lines.append("|---|---|---|---|")
        for g, v in r["groups"].items():
            lines.append(f"| {g} | {v['ms_per_step']:.3f} | {v['ms_per_step_best']:.3f} | {v['calls_per_step']} |")
        lines.append("")
        lines.append("| operator | group | calls / step | ms / step (median) | ms / step (best) |")
        lines.append("|---|---|---|---|---|")
        for o in r["operators"][:25]:
            lines.append(f"| `{o['name']}` | {o['group']} | {o['calls_per_step']} | {o['ms_per_step']:.3f} | "
                         f"{o['ms_per_step_best']:.3f} |")
        lines.append("")
        if r["inside_xnnpack_ms_per_step"]:
            lines.append("Inside the XNNPACK partitions (XNNPACK's own per-operator events, ms / step): " + ", ".join(
                f"{k} {v:.3f}" for k, v in list(r["inside_xnnpack_ms_per_step"].items())[:12]))
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], help="name=BUNDLE_DIR (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-fill", dest="fill", action="store_false",
                    help="do not write the first --context cache positions (fast; underestimates cache reads)")
    ap.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    results = {"command": "python " + " ".join(__import__("sys").argv), "threads": args.threads,
               "machine": platform.machine(), "load_average": os.getloadavg(), "bundles": {}}
    for spec in args.bundle:
        name, _, path = spec.partition("=")
        results["bundles"][name] = profile_bundle(Path(path), args.threads, args.context, args.prefill, args.steps,
                                                  args.fill)
        r = results["bundles"][name]
        print(f"{name}: {r['wall_ms_per_step']:.2f} ms/step wall, best-case operators "
              f"{r['operators_ms_per_step_best']:.2f}; " + ", ".join(
            f"{g} {v['ms_per_step']:.2f} (best {v['ms_per_step_best']:.2f})" for g, v in r["groups"].items()) +
            f"; interpreter gap {r['interpreter_gap_ms_per_step']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
