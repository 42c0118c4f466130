"""What the W4A8 parity contract separates on one W4A8 bundle: per-position max |delta logit| (median, p90, max) and
top-1 agreement against the W4A8 numpy reference for the bundle's .pte, for the reference itself under relative
activation jitter of several sizes (the contract's noise floor uses 2^-20), and for the same weights with fp32
activations (exact any4 behind a W4A8 label, which the contract must fail). runtime_py/parity.py states the contract.

    .venv/bin/python benchmarks/w4a8_contract.py BUNDLE [--steps 32] [--prompts 3] [--max-prompt 200] \
        [--out benchmarks/results/w4a8_contract.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from pocketllm.export.bundle.manifest import read_manifest  # noqa: E402
from pocketllm.export.tokenizer import load_tokenizer  # noqa: E402
from pocketllm.runtime_py.model import ReferenceModel  # noqa: E402
from pocketllm.runtime_py.parity import (DEFAULT_PROMPTS, W4A8_JITTER, RecordedReference, compare_engines,  # noqa: E402
                                         contract_criteria, manifest_score_rule, noise_floor, verdict)
from pocketllm.runtime_py.runners import open_runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="a bundle exported with --quant any4-w4a8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=3, help="how many of parity's default prompts")
    ap.add_argument("--max-prompt", type=int, default=200, help="prompt tokens kept")
    ap.add_argument("--jitters", default="1e-7,3e-7,9.5367431640625e-07,3e-6")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        ap.error(f"{args.bundle}: not a bundle (no manifest.json)")
    m = read_manifest(args.bundle, verify=False, verify_reference=False)
    if m.get("quantization", {}).get("activations") != "int8":
        ap.error(f"{args.bundle}: not a W4A8 bundle (export it with --quant any4-w4a8)")
    context = min(int(m["model"]["max_context"]), args.max_prompt + args.steps + 2)
    ref_dir = args.bundle / m["reference"]["dir"]

    def reference(**kw) -> ReferenceModel:
        return ReferenceModel.from_checkpoint(ref_dir, max_context=context, score_rule=manifest_score_rule(m), **kw)

    tok = load_tokenizer(args.bundle, m["tokenizer"]["bos_id"])
    prompts = [tok.encode(t)[:args.max_prompt] for t in DEFAULT_PROMPTS[:args.prompts]]
    clean = reference(activations="int8")
    recorded = [RecordedReference(clean, None) for _ in prompts]

    def run(engine) -> list[dict]:
        return [compare_engines(r, engine, ids, args.steps, None) for r, ids in zip(recorded, prompts)]

    criteria = contract_criteria(1e-3, w4a8=True)
    floor = noise_floor(run(reference(activations="int8", activation_jitter=W4A8_JITTER)), criteria)
    engines = {".pte": open_runner(args.bundle, "executorch", threads=1, verify=False)}
    engines |= {f"reference, jitter {float(e):.2g}": reference(activations="int8", activation_jitter=float(e))
                for e in args.jitters.split(",")}
    engines["same weights, fp32 activations"] = reference(activations="fp32")
    rows = {}
    print(f"{'engine':34s} {'median':>9s} {'p90':>9s} {'max':>9s} {'top-1':>6s}  contract")
    for name, engine in engines.items():
        results = run(engine)
        v = verdict(results, criteria, floor)
        d = np.array([x for r in results for x in r["per_position_max_abs_delta_prefill"] + r["per_step_max_abs_delta"]])
        rows[name] = {"median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)), "max": float(d.max()),
                      "top1": v["top1_agreement"], "passed": v["passed"]}
        print(f"{name:34s} {rows[name]['median']:9.4f} {rows[name]['p90']:9.4f} {rows[name]['max']:9.4f} "
              f"{v['top1_agreement']:6.3f}  {'pass' if v['passed'] else 'FAIL'}")
    print(f"bounds: {json.dumps(v['bounds'])}, top-1 >= {v['min_top1_here']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "date": time.strftime("%Y-%m-%d %H:%M"),
                                        "positions": floor["positions"], "criteria": criteria, "noise_floor": floor,
                                        "bounds": v["bounds"], "min_top1": v["min_top1_here"], "engines": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
