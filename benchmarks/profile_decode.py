"""Where a bundle's decode step spends its time: ExecuTorch's ETDump per operator call, aggregated per kind of work.

    .venv/bin/python benchmarks/profile_decode.py --bundle any4=out/b/any4 --bundle w4a8=out/b/w4a8 \
        --threads 2 --context 0 --steps 32 --out benchmarks/results/profile_decode_0.5b

Each bundle's .pte is loaded with event tracing on (`_load_for_executorch(..., enable_etdump=True)`), our kernel
library and ExecuTorch's llama ops registered, then: one prefill call of --prefill tokens at position --context,
one warm-up decode call, and --steps decode calls after it. The ETDump's events of the decode calls are read with
ExecuTorch's Inspector; every operator call (a portable/optimized aten kernel, a llama:: or pocketllm:: kernel, or an
XNNPACK delegate call = one partition) is timed by the runtime itself. Reported per decode step (medians over the
steps): the method's wall time, the sum of operator calls, the gap between the two (the interpreter: instruction
dispatch, tensor resizes, memory planning), and the time and count per group:

    any4 / w4a8 / int8 linear   pocketllm::any4_linear, any4_linear_w4a8, int8_linear (decoder layers and LM head)
    attention                   pocketllm::infllm_attention, llama::custom_sdpa
    kv cache                    llama::update_cache
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
    if "delegate" in n or "xnnpack" in n:
        return "xnnpack"
    return "portable"


def profile_bundle(bundle: Path, threads: int, context: int, prefill: int, steps: int) -> dict:
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

    call(rng.integers(3, vocab, size=prefill), context)
    call([5], context + prefill)
    walls = [call([int(rng.integers(3, vocab))], context + prefill + 1 + i) for i in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    # event blocks: one per method execution, in call order (prefill, warm-up, then the decode steps)
    blocks = [b for b in inspector.event_blocks if b.name.startswith("Execute")]
    decode_blocks = blocks[-steps:]
    # Per instruction: one outer event (OPERATOR_CALL, or DELEGATE_CALL for an XNNPACK partition) whose duration
    # is the call's; a kernel's own event (native_call_<op>, pocketllm::<op>.out, ...) nested in it names it;
    # XNNPACK's per-operator events (is_delegated_op) are nested in the DELEGATE_CALL and reported apart.
    per_op: dict[str, list[float]] = defaultdict(list)  # name -> ms per step
    inside_xnnpack: dict[str, list[float]] = defaultdict(list)
    calls_per_step: dict[str, int] = {}
    method_ms, ops_ms = [], []
    for block in decode_blocks:
        outer: dict[int, tuple[str, float]] = {}
        names: dict[int, str] = {}
        total = None
        sums_x: dict[str, float] = defaultdict(float)
        for ev in block.events:
            if not ev.perf_data:
                continue
            ms = float(statistics.median(ev.perf_data.raw))
            if ev.name == "Method::execute":
                total = ms
            elif ev.is_delegated_op:
                sums_x[ev.name.split(" #")[0]] += ms
            elif ev.name in ("OPERATOR_CALL", "DELEGATE_CALL"):
                outer[ev._instruction_id] = (ev.name, ms)
            else:
                names.setdefault(ev._instruction_id, ev.name)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for iid, (kind, ms) in outer.items():
            name = "XNNPACK partition (DELEGATE_CALL)" if kind == "DELEGATE_CALL" else \
                names.get(iid, "unnamed operator call (prim / sym ops)")
            sums[name] += ms
            counts[name] += 1
        for k, v in sums.items():
            per_op[k].append(v)
        for k, v in sums_x.items():
            inside_xnnpack[k].append(v)
        calls_per_step.update(counts)
        ops_ms.append(sum(sums.values()))
        if total is not None:
            method_ms.append(total)
    ops = [{"name": k, "group": group_of(k), "calls_per_step": calls_per_step[k],
            "ms_per_step": statistics.median(v)} for k, v in per_op.items()]
    ops.sort(key=lambda o: -o["ms_per_step"])
    groups: dict[str, dict] = {}
    for o in ops:
        g = groups.setdefault(o["group"], {"ms_per_step": 0.0, "calls_per_step": 0})
        g["ms_per_step"] += o["ms_per_step"]
        g["calls_per_step"] += o["calls_per_step"]
    method = statistics.median(method_ms) if method_ms else 1000 * statistics.median(walls)
    op_sum = statistics.median(ops_ms)
    return {"bundle": bundle.name, "quantization": manifest.get("quantization"),
            "pte_mib": round(entry["size"] / 2**20, 1), "context": context, "steps": steps,
            "wall_ms_per_step": 1000 * statistics.median(walls), "method_ms_per_step": method,
            "operators_ms_per_step": op_sum,
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
        lines.append("| group | ms / step | calls / step |")
        lines.append("|---|---|---|")
        for g, v in r["groups"].items():
            lines.append(f"| {g} | {v['ms_per_step']:.3f} | {v['calls_per_step']} |")
        lines.append("")
        lines.append("| operator | group | calls / step | ms / step |")
        lines.append("|---|---|---|---|")
        for o in r["operators"][:25]:
            lines.append(f"| `{o['name']}` | {o['group']} | {o['calls_per_step']} | {o['ms_per_step']:.3f} |")
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
    ap.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.md")
    args = ap.parse_args()
    results = {"command": "python " + " ".join(__import__("sys").argv), "threads": args.threads,
               "machine": platform.machine(), "load_average": os.getloadavg(), "bundles": {}}
    for spec in args.bundle:
        name, _, path = spec.partition("=")
        results["bundles"][name] = profile_bundle(Path(path), args.threads, args.context, args.prefill, args.steps)
        r = results["bundles"][name]
        print(f"{name}: {r['wall_ms_per_step']:.2f} ms/step wall; " + ", ".join(
            f"{g} {v['ms_per_step']:.2f}" for g, v in r["groups"].items()) +
            f"; interpreter gap {r['interpreter_gap_ms_per_step']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
