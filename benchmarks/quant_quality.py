"""Quantization quality on a trained model: held-out perplexity, bits per weight, reconstruction error, time.

    .venv/bin/python benchmarks/quant_quality.py            # models/tiny-austen, Persuasion, context 256

For fp32 and each scheme (int8, int4 g128, nf4 g128, any4 g128, any4 per row), quantizes the checkpoint with
`export.quant.quantize_checkpoint` (the code behind `pocketllm quantize`, default built-in calibration prompt),
then scores the held-out text with `perplexity_of` (the code behind `pocketllm perplexity`: non-overlapping
windows of `--context` tokens, each starting with BOS) on the torch engine in fp32. Writes
benchmarks/results/quant_quality.json and a markdown table next to it, and prints the table.

The acceptance ratio is (ppl_any4_g128 - ppl_fp32) / (ppl_int4_g128 - ppl_fp32): the any4 paper reports about
0.5 for Llama3-8B on WikiText-2; pocketllm requires at most 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see export/cli/quantize.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pocketllm.export.checkpoint import open_checkpoint  # noqa: E402
from pocketllm.export.cli.engines import make_engine  # noqa: E402
from pocketllm.runtime_py.evaluate import perplexity_of  # noqa: E402
from pocketllm.export.quant.calibrate import ACT_STATS, DEFAULT_ACT_STAT  # noqa: E402
from pocketllm.export.quant.quantize import quantize_checkpoint  # noqa: E402
from pocketllm.export.tokenizer import load_tokenizer  # noqa: E402

CONFIGS = [  # (label, scheme, group size, LM head (tied: = the embedding table), activations of the any4 layers)
    ("fp32", None, None, "none", "fp32"),
    ("int8", "int8", None, "none", "fp32"),
    ("int4 g128", "int4", 128, "none", "fp32"),
    ("nf4 g128", "nf4", 128, "none", "fp32"),
    ("any4 g128", "any4", 128, "none", "fp32"),
    ("any4 per-row", "any4", 0, "none", "fp32"),
    # the LM head (tied: the embedding table, stored once) quantized; int8 is the default of a 4-bit export
    ("any4 g128 + int8 head", "any4", 128, "int8", "fp32"),
    ("any4 g128 + any4 head", "any4", 128, "any4", "fp32"),
    # the same any4 + int8-head weights with int8 activations in the decoder layers (--quant any4-w4a8)
    ("any4 g128 W4A8 + int8 head", "any4", 128, "int8", "int8"),
]


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@torch.no_grad()
def kl_vs_fp32(engines: dict, ids: list[int], bos_id, context: int, rows: list[dict]) -> None:
    """Mean KL(p_fp32 || p_quantized) per token and top-1 agreement with fp32, windows as perplexity_of's."""
    step = context - 1 if bos_id is not None else context
    kl = {k: 0.0 for k in engines}
    agree = {k: 0 for k in engines}
    count = 0
    for start in range(0, len(ids), step):
        window = ([bos_id] if bos_id is not None else []) + ids[start:start + step]
        if len(window) < 2:
            break
        logp = {}
        for label, engine in engines.items():
            engine.reset()
            x = torch.from_numpy(np.asarray(engine.forward(np.asarray(window, dtype=np.int64), 0))[:-1]).double()
            logp[label] = torch.log_softmax(x, dim=-1)
        ref = logp["fp32"]
        for label, lp in logp.items():
            kl[label] += float((ref.exp() * (ref - lp)).sum())
            agree[label] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        count += len(window) - 1
    for row in rows:
        row["kl"] = kl[row["label"]] / max(count, 1)
        row["top1_agreement"] = agree[row["label"]] / max(count, 1)
        row["kl_tokens"] = count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "models" / "tiny-austen")
    ap.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "austen" / "persuasion.txt")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens (default: all).")
    ap.add_argument("--calibration", default=None, help="As `pocketllm quantize --calibration` (default built-in).")
    ap.add_argument("--act-stat", default=DEFAULT_ACT_STAT, choices=ACT_STATS,
                    help="any4's calibration column statistic (default: the paper's |mean activation|).")
    ap.add_argument("--only", default=None, help="Comma-separated labels to run (default: all).")
    ap.add_argument("--any4-seeds", default="0", help="k-means seeds for any4 g128 (extra seeds show the spread "
                                                         "that quantization noise alone causes); the first is the "
                                                         "one the acceptance ratio uses.")
    ap.add_argument("--kl-tokens", type=int, default=16384,
                    help="Tokens (from the start of the text) for the KL(fp32 || quantized) and top-1 agreement "
                         "columns.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quant_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=170)

    base = open_checkpoint(args.checkpoint)
    spec = base.spec
    tok = load_tokenizer(base.dir, spec.bos_token_id)
    ids = tok.encode_plain(args.text.read_text(encoding="utf-8"))
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    wanted = set(args.only.split(",")) if args.only else None
    seeds = [int(x) for x in args.any4_seeds.split(",")]
    configs = []
    for label, scheme, group, head, acts in CONFIGS:
        if wanted and label not in wanted and label != "fp32":
            continue
        configs.append((label, scheme, group, head, acts, seeds[0]))
        if label == "any4 g128":
            configs += [(f"any4 g128 seed {s}", scheme, group, head, acts, s) for s in seeds[1:]]
    rows, engines, summaries = [], {}, {}
    quantized: dict[tuple, Path] = {}  # configs that differ only in activations share one checkpoint
    with tempfile.TemporaryDirectory(prefix="quant_quality.") as tmp:
        for label, scheme, group, head, acts, seed in configs:
            row = {"label": label, "scheme": scheme or "fp32", "group_size": group, "lm_head": head,
                   "activations": acts}
            if scheme is None:
                ckpt, row["quantize_seconds"], row["bits_per_weight"] = base, 0.0, 32.0
                row.update(rel_error=0.0, weighted_rel_error=0.0)
            else:
                key = (scheme, group, head, seed)
                out = Path(tmp) / label.replace(" ", "_").replace("+", "")
                t0 = time.perf_counter()
                if key not in quantized:
                    quantized[key] = out
                    result = quantize_checkpoint(base, out, scheme, group, calibration=args.calibration,
                                                 act_stat=args.act_stat, seed=seed, lm_head=head)
                    summaries[key] = result.summary()
                row["quantize_seconds"] = time.perf_counter() - t0
                s = summaries[key]
                row["seed"] = seed
                # over the decoder layers' weights (the head, when quantized, has its own column)
                row["bits_per_weight"] = s["bits_per_weight"]
                row["rel_error"] = s["rms_rel_error"]  # sqrt(sum ||W - Wq||^2 / sum ||W||^2) over quantized tensors
                row["weighted_rel_error"] = s["mean_weighted_rel_error"]
                row["calibration_tokens"] = s["calibration_tokens"]
                ckpt = open_checkpoint(quantized[key])
            row["checkpoint_mib"] = checkpoint_bytes(ckpt.dir) / 2**20
            engine = make_engine("torch", ckpt, args.context, "fp32")
            if acts == "int8":  # what `--quant any4-w4a8` exports: the decoder's any4 layers on W4A8
                from pocketllm.export.nn.quant_linear import use_w4a8

                row["w4a8_layers"] = len(use_w4a8(engine.model))
            t0 = time.perf_counter()
            nll, count = perplexity_of(engine, ids, spec.bos_token_id, args.context)
            row.update(nll=nll, perplexity=float(np.exp(nll)), tokens=count, score_seconds=time.perf_counter() - t0)
            console.print(f"{label:18s} ppl {row['perplexity']:.4f}  bpw {row['bits_per_weight']:.3f}  "
                          f"rel err {row['rel_error']:.4f}  quantize {row['quantize_seconds']:.1f} s", highlight=False)
            rows.append(row)
            engines[label] = engine
        kl_vs_fp32(engines, ids[:args.kl_tokens], spec.bos_token_id, args.context, rows)

    fp32 = rows[0]["perplexity"]
    for row in rows:
        row["ppl_increase"] = row["perplexity"] - fp32
    by_label = {r["label"]: r for r in rows}
    ratio = None
    if "any4 g128" in by_label and "int4 g128" in by_label and by_label["int4 g128"]["ppl_increase"] > 0:
        ratio = by_label["any4 g128"]["ppl_increase"] / by_label["int4 g128"]["ppl_increase"]
    # seed runs of the plain any4 g128 row only (not the LM head / W4A8 rows, which share the prefix)
    any4_runs = [r for r in rows if r["label"] == "any4 g128" or r["label"].startswith("any4 g128 seed ")]
    spread = None
    if len(any4_runs) > 1:
        inc = np.array([r["ppl_increase"] for r in any4_runs])
        spread = {"seeds": [r["seed"] for r in any4_runs], "ppl_increase": inc.tolist(), "mean": float(inc.mean()),
                  "std": float(inc.std(ddof=1)), "stderr_of_mean": float(inc.std(ddof=1) / np.sqrt(len(inc)))}
        if "int4 g128" in by_label and by_label["int4 g128"]["ppl_increase"] > 0:
            # One seed is one draw of the quantization noise; the mean over seeds estimates any4's expected increase.
            spread["mean_over_int4_g128"] = spread["mean"] / by_label["int4 g128"]["ppl_increase"]

    command = shlex.join([".venv/bin/python", "benchmarks/quant_quality.py", *sys.argv[1:]])
    result = {
        "command": command,
        "checkpoint": str(args.checkpoint), "text": str(args.text), "context": args.context, "tokens": rows[0]["tokens"],
        "calibration": args.calibration or "builtin", "act_stat": args.act_stat,
        "device": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "any4_g128_over_int4_g128_ppl_increase": ratio,
        "any4_g128_seed_spread": spread,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"{args.checkpoint.name}: held-out perplexity on {args.text.name} "
                        f"({rows[0]['tokens']} tokens, context {args.context})")
    headers = ("weights", "LM head", "activations", "bits/weight", "perplexity", "increase", "KL nats/tok",
               "top-1 agree", "weight rel. err", "act-weighted err", "quantize s", "MiB")
    for h in headers:
        table.add_column(h, justify="right")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = (r["label"], {"none": "fp32"}.get(r["lm_head"], r["lm_head"]), r["activations"],
                 f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}", f"{r['ppl_increase']:+.3f}",
                 f"{r['kl']:.2e}", f"{100 * r['top1_agreement']:.2f}%", f"{r['rel_error']:.4f}",
                 f"{r['weighted_rel_error']:.4f}", f"{r['quantize_seconds']:.1f}", f"{r['checkpoint_mib']:.1f}")
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    lines = []
    if ratio is not None:
        lines.append(f"any4 g128 perplexity increase / int4 g128 increase = {ratio:.3f} (acceptance: <= 0.6)")
    if spread is not None:
        lines.append(f"any4 g128 over seeds {spread['seeds']}: increase {spread['mean']:+.3f} +- {spread['std']:.3f} "
                     "(std): the perplexity change quantization noise alone causes")
        if "mean_over_int4_g128" in spread:
            lines.append(f"mean any4 g128 increase over seeds / int4 g128 increase = "
                         f"{spread['mean_over_int4_g128']:.3f} (standard error of the mean "
                         f"{spread['stderr_of_mean']:.3f} ppl)")
    for line in lines:
        console.print(line, highlight=False)
    md += [""] + lines if lines else []
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    console.print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
