"""Prefill and decode speed of one model across engines and context lengths; writes JSON and a PNG plot.

    .venv/bin/python benchmarks/decode_speed.py --threads 2 \
        --eager CKPT \
        --bundle fp32=out/m-fp32 --bundle 8da4w=out/m-8da4w --bundle any4=out/m-any4 \
        --bundle any4-dense=out/m-any4-dense \
        --contexts 0,1024,4096 --long-contexts 16384 --long-variants any4,any4-dense \
        --out benchmarks/results/decode_speed_0.5b

What is measured, per variant and context length C (the number of positions already in the KV cache):
- prefill tok/s: a forward call of --prefill-tokens tokens at positions C .. C+P-1;
- decode tok/s: --decode-steps single-token forward calls at positions C+P, C+P+1, ... (after one warm-up call).
All variants are loaded together and timed round-robin, --rounds rounds per context; reported: the median prefill
call and 1 / the median decode call over all rounds (the mean is kept as decode_tok_s_mean).
The cache is not filled by a real prefill of C tokens first (a 16K-token prefill of a 0.5B model takes many minutes
on two cores): attention cost depends on how many positions it reads, not on their values, so calls at start_pos C
time the same work as after a real prompt. InfLLM v2's selection reads every compressed key too (its memo of
compressed keys is rebuilt by the warm-up call, then extended by one entry every 16 tokens, as in real decoding).
Every variant runs in this one process with the same thread count (ExecuTorch threadpool and torch intra-op
threads). Export time and peak RSS come from each bundle's manifest (`pocketllm export` records them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PteRunner:
    def __init__(self, bundle: Path, threads: int):
        from pocketllm.runtime_py.runners.executorch import ExecutorchRunner

        t0 = time.perf_counter()
        self.engine = ExecutorchRunner(bundle, verify=False, threads=threads)
        self.load_s = time.perf_counter() - t0
        self.max_context = self.engine.max_context
        self.manifest = self.engine.manifest
        import torch

        self.torch = torch

    def call(self, tokens: np.ndarray, start: int) -> None:
        t = self.torch.from_numpy(tokens.astype(np.int64))[None]
        self.engine.method.execute([t, self.torch.tensor([start], dtype=self.torch.long)])


class EagerRunner:
    def __init__(self, checkpoint: Path, threads: int, max_context: int):
        import torch

        from pocketllm.export.nn import load_model

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, _ = load_model(checkpoint, max_context=max_context, dtype="fp32")
        self.load_s = time.perf_counter() - t0
        self.max_context = max_context
        self.manifest = None
        self.torch = torch

    def call(self, tokens: np.ndarray, start: int) -> None:
        with self.torch.no_grad():
            self.model(self.torch.from_numpy(tokens.astype(np.int64))[None], start)


def sample(runner, context: int, prefill_tokens: int, decode_steps: int, vocab: int, seed: int) -> tuple:
    """One prefill call at positions context.., then decode_steps single-token calls after it (plus one warm-up).
    Returns (prefill tokens, prefill seconds, [decode seconds])."""
    rng = np.random.default_rng(context * 1000 + seed)
    P = min(prefill_tokens, runner.max_context - context - decode_steps - 1)
    if P < 1:
        raise SystemExit(f"context {context} + steps does not fit max_context {runner.max_context}")
    t0 = time.perf_counter()
    runner.call(rng.integers(3, vocab, size=P), context)
    prefill_s = time.perf_counter() - t0
    pos = context + P
    runner.call(np.array([5]), pos)  # warm-up decode call
    times = []
    for i in range(decode_steps):
        t0 = time.perf_counter()
        runner.call(np.array([int(rng.integers(3, vocab))]), pos + 1 + i)
        times.append(time.perf_counter() - t0)
    return P, prefill_s, times


def summarize(context: int, P: int, prefill_times: list[float], decode_times: list[float]) -> dict:
    # Medians: a shared VM stalls now and then for tens of ms, which a mean over a few calls would absorb.
    return {"context": context, "prefill_tokens": P, "prefill_calls": len(prefill_times),
            "prefill_s": float(np.median(prefill_times)), "prefill_tok_s": P / float(np.median(prefill_times)),
            "decode_steps": len(decode_times), "decode_tok_s": 1.0 / float(np.median(decode_times)),
            "decode_tok_s_mean": len(decode_times) / sum(decode_times),
            "decode_ms_median": 1000 * float(np.median(decode_times))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], help="name=BUNDLE_DIR (repeatable)")
    ap.add_argument("--eager", type=Path, help="checkpoint for the eager torch (fp32) baseline")
    ap.add_argument("--eager-max-context", type=int, default=4608)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="0,1024,4096")
    ap.add_argument("--long-contexts", default="", help="extra contexts, only for --long-variants")
    ap.add_argument("--long-variants", default="")
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8, help="decode calls per variant per round")
    ap.add_argument("--rounds", type=int, default=4, help="round-robin rounds over the variants per context")
    ap.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.png")
    args = ap.parse_args()

    contexts = [int(c) for c in args.contexts.split(",") if c]
    long_contexts = [int(c) for c in args.long_contexts.split(",") if c]
    long_variants = {v for v in args.long_variants.split(",") if v}
    variants: list[tuple[str, object]] = []
    if args.eager:
        variants.append(("eager", lambda: EagerRunner(args.eager, args.threads, args.eager_max_context)))
    for spec in args.bundle:
        name, _, path = spec.partition("=")
        variants.append((name, lambda p=Path(path): PteRunner(p, args.threads)))

    results = {"device": {"machine": platform.machine(), "processor": platform.processor(),
                          "cpu_count": __import__("os").cpu_count(), "threads": args.threads},
               "method": __doc__.split("What is measured", 1)[1].strip(), "prefill_tokens": args.prefill_tokens,
               "decode_steps_per_round": args.decode_steps, "rounds": args.rounds, "variants": {}}
    # Every variant is loaded at once and timed round-robin (--rounds rounds per context), so that machine noise
    # (a shared VM's stalls, another tenant's burst) lands on all of them alike instead of on whichever ran then.
    runners = {}
    for name, make in variants:
        runners[name] = make()
        print(f"loaded {name} in {runners[name].load_s:.1f} s", flush=True)
    vocab_of = {n: (r.manifest or {}).get("model", {}).get("vocab_size") or r.model.spec.vocab_size
                for n, r in runners.items()}
    rows: dict[str, list] = {n: [] for n in runners}
    for c in sorted(set(contexts) | set(long_contexts)):
        active = []
        for n, r in runners.items():
            if c not in contexts and n not in long_variants:
                continue
            if c + args.prefill_tokens + args.decode_steps + 2 > r.max_context:
                print(f"{n}: skip context {c} (max_context {r.max_context})", flush=True)
                continue
            active.append(n)
        prefill = {n: [] for n in active}
        decode = {n: [] for n in active}
        prompt_len = {}
        for rnd in range(args.rounds):
            for n in active:
                prompt_len[n], pre, dec = sample(runners[n], c, args.prefill_tokens, args.decode_steps, vocab_of[n],
                                                 rnd)
                prefill[n].append(pre)
                decode[n].extend(dec)
        for n in active:
            r = summarize(c, prompt_len[n], prefill[n], decode[n])
            rows[n].append(r)
            print(f"{n:>12} ctx {c:>6}: prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.2f} "
                  f"tok/s", flush=True)
    for name, runner in runners.items():
        entry = {"load_s": runner.load_s, "results": rows[name]}
        if runner.manifest:
            m = runner.manifest
            t = m["targets"]["executorch"]
            entry.update(bundle=str(runner.engine.bundle), pte_mib=t["size"] / 2**20, quantization=m["quantization"],
                         export=m.get("export"), attention=m["attention"]["per_layer"][0])
        results["variants"][name] = entry
    results["peak_rss_mib_benchmark_process"] = peak_rss_mib()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{args.out}.json"), Path(f"{args.out}.png")  # the stem may contain dots
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, v in results["variants"].items():
        rows = v["results"]
        if not rows:
            continue
        x = [max(r["context"], 1) for r in rows]
        axes[0].plot(x, [r["prefill_tok_s"] for r in rows], marker="o", label=name)
        axes[1].plot(x, [r["decode_tok_s"] for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ("prefill tok/s", "decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("positions already in the cache (0 plotted at 1)")
        ax.set_title(f"{title}, {results['device']['threads']} threads")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
