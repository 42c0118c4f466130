"""ONNX Runtime prefill / decode speed and session memory of ONNX bundles (runtime_py/runners/onnx.py).

    .venv/bin/python benchmarks/onnx_speed.py --threads 2 \
        --bundle fp32=/tmp/o-fp32 --bundle int4=/tmp/o-int4 --bundle any4=/tmp/o-any4 \
        --contexts 0,1024 --rounds 4 --out benchmarks/results/onnx_0.5b

Per variant and context C (positions already in the KV cache, filled with random values: attention cost depends on
how many positions it reads, not on their values):
- prefill tok/s: one call of --prefill-tokens tokens at positions C .. C+P-1 (median over rounds);
- decode tok/s: 1 / the median of --decode-steps single-token calls after it (one warm-up call first).
All variants live in this one process and are timed round-robin (variant order rotates every round), so machine
load hits them alike; report ratios. Session memory is measured apart, one fresh process per variant: VmRSS after
creating the onnxruntime session and after one decode call (ORT prepacks and folds at session creation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RSS_SCRIPT = """
import json, sys
import numpy as np
def rss():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
before = rss()
from pocketllm.runtime_py.runners.onnx import OnnxEngine
e = OnnxEngine(sys.argv[1], threads=int(sys.argv[2]))
session = rss()
e.forward(np.arange(1, 9, dtype=np.int64), 0)
e.forward(np.array([5], dtype=np.int64), 8)
after = rss()
print("RESULT:" + json.dumps({"before_mib": before["VmRSS"], "session_mib": session["VmRSS"],
                              "after_decode_mib": after["VmRSS"], "peak_mib": after["VmHWM"]}))
"""


def session_rss(bundle: Path, threads: int) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bundle), str(threads)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.split("RESULT:", 1)[1])


def fill_cache(engine, context: int, rng) -> None:
    engine.reset()
    for pk, pv, _, _ in engine.kv_io:
        shape = list(engine.past[pk].shape)
        shape[2] = context
        engine.past[pk] = rng.standard_normal(shape).astype(np.float32)
        engine.past[pv] = rng.standard_normal(shape).astype(np.float32)
    engine.length = context


def onnx_dir(bundle: Path) -> Path:
    """A bundle's onnx/ folder, or the folder itself."""
    return bundle / "onnx" if (bundle / "onnx" / "genai_config.json").is_file() else bundle


def bundle_size(bundle: Path) -> float:
    folder = onnx_dir(bundle)
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True, help="name=BUNDLE_DIR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="0")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from pocketllm.runtime_py.runners.onnx import OnnxEngine

    variants = dict(b.split("=", 1) for b in args.bundle)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "loadavg_start": os.getloadavg(), "variants": {}}
    for name, path in variants.items():
        mpath = Path(path) / "manifest.json"
        m = json.loads(mpath.read_text()) if mpath.is_file() else {}
        entry = {"bundle": path, "onnx_mib": round(bundle_size(Path(path)), 1),
                 "export": m.get("export"), "linears": m.get("targets", {}).get("onnx", {}).get("linears")}
        if not args.no_rss:
            entry["rss"] = session_rss(onnx_dir(Path(path)), args.threads)
        result["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)

    engines = {}
    for name, path in variants.items():
        t0 = time.perf_counter()
        engines[name] = OnnxEngine(onnx_dir(Path(path)), threads=args.threads)
        result["variants"][name]["load_s"] = round(time.perf_counter() - t0, 2)
    rng = np.random.default_rng(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    times = {(n, c): {"prefill": [], "decode": []} for n in variants for c in contexts}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for c in contexts:
            for name in order:
                e = engines[name]
                fill_cache(e, c, rng)
                prompt = rng.integers(3, 1000, args.prefill_tokens)
                t0 = time.perf_counter()
                e.forward(prompt, c)
                times[name, c]["prefill"].append(time.perf_counter() - t0)
                pos = c + args.prefill_tokens
                e.forward(np.array([7]), pos)  # warm-up step
                pos += 1
                for _ in range(args.decode_steps):
                    t0 = time.perf_counter()
                    e.forward(np.array([7]), pos)
                    times[name, c]["decode"].append(time.perf_counter() - t0)
                    pos += 1
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    for (name, c), t in times.items():
        result["variants"][name].setdefault("speed", {})[str(c)] = {
            "prefill_tok_s": round(args.prefill_tokens / statistics.median(t["prefill"]), 1),
            "decode_tok_s": round(1 / statistics.median(t["decode"]), 2),
            "decode_tok_s_mean": round(len(t["decode"]) / sum(t["decode"]), 2)}
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        out = args.out if args.out.suffix == ".json" else Path(f"{args.out}.json")
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
