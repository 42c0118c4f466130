"""Export one checkpoint (floating point or already quantized by `pocketllm quantize`) to a Core ML package:

    python -m export.targets.coreml CHECKPOINT OUT [--max-context N] [--prefill-chunk C] [--score-rule RULE]

writes OUT/model.mlpackage and OUT/coreml_entry.json (the manifest's `targets.coreml` entry) atomically, and prints
stage timings and peak RSS. Until the CLI's `pocketllm export --target coreml` lands (issue #12), this is how the
target is run by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from export.errors import PocketllmError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.targets.coreml", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--score-rule", default="exact_softmax")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        import torch

        from export.checkpoint import open_checkpoint
        from export.init_checkpoint import atomic_directory
        from export.nn.load import load_model, resolve_max_context
        from export.targets.coreml.options import DEFAULT_PREFILL_CHUNK, CoreMLOptions

        torch.set_num_threads(args.threads)
        ckpt = open_checkpoint(args.checkpoint)
        max_context = resolve_max_context(ckpt.spec, args.max_context)
        scheme = ckpt.quantization.scheme if ckpt.quantization is not None else "none"
        options = CoreMLOptions(max_context=max_context, quant=scheme,
                                prefill_chunk=args.prefill_chunk or min(DEFAULT_PREFILL_CHUNK, max_context),
                                infllm_score_rule=args.score_rule)
        t0 = time.perf_counter()

        def stage(name):
            from contextlib import contextmanager

            @contextmanager
            def timed():
                s = time.perf_counter()
                yield
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"  {name:<18} {time.perf_counter() - s:8.1f} s   peak RSS so far {peak:7.0f} MiB",
                      file=sys.stderr, flush=True)

            return timed()

        with atomic_directory(args.out) as tmp:
            with stage("load"):
                model, _ = load_model(ckpt, max_context=max_context, dtype="fp32")
            from export.targets.coreml import export

            quant = {"scheme": scheme}
            if ckpt.quantization is not None:
                quant.update(group_size=ckpt.quantization.group_size,
                             checkpoint_bits_per_weight=round(ckpt.quantization.bits_per_weight(), 4))
            entry = export(model, ckpt.spec, options, tmp, stage=stage, quant_info=quant)
            del model
            entry["timings"]["total_s"] = round(time.perf_counter() - t0, 2)
            entry["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            (tmp / "coreml_entry.json").write_text(json.dumps(entry, indent=2) + "\n")
    except PocketllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in (args.out / "model.mlpackage").rglob("*") if p.is_file())
    print(json.dumps({"package_bytes": size, "weights_bytes": entry["weights_bytes"],
                      "stored_bits_per_weight": entry["quantization"]["stored_bits_per_weight"],
                      "timings": entry["timings"], "peak_rss_mib": entry["peak_rss_mib"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
