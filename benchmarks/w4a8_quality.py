"""W4A8 any4 (pocketllm::any4_linear_w4a8) against exact any4 (pocketllm::any4_linear) on the same quantized
checkpoint: per-layer output error on real activations, and end to end over held-out text.

    PYTHONPATH=. .venv/bin/python -m export.cli.main quantize --checkpoint models/tiny-austen --scheme any4 \\
        --out /tmp/ta-any4
    PYTHONPATH=. .venv/bin/python benchmarks/w4a8_quality.py --any4 /tmp/ta-any4 --fp32 models/tiny-austen

The torch model runs the any4 checkpoint twice: as loaded (every any4 linear through the exact op), and with every
any4 linear's math swapped for the W4A8 op (its torch reference, which the C++ kernel and the numpy twin match bit
for bit) on weights from `w4a8_pack`. Nothing else changes (embedding, norms, attention, fp32 LM head).

- per layer: ||y_w4a8 - y_any4|| / ||y_any4|| over the windows' tokens, each linear fed the exact model's inputs;
- end to end, windows of --context tokens (BOS first) over the first --tokens tokens of the text: KL(any4 || w4a8)
  per token, top-1 agreement, perplexity of both, and with --fp32 also KL(fp32 || any4) and KL(fp32 || w4a8).
Writes JSON (--out) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pocketllm.export.nn.load import load_model  # noqa: E402
from pocketllm.export.nn.quant_linear import Any4Linear  # noqa: E402
from pocketllm.export.ops.any4_linear_w4a8 import w4a8_pack  # noqa: E402  (registers pocketllm::any4_linear_w4a8)
from pocketllm.export.tokenizer import load_tokenizer  # noqa: E402


class W4A8Linear(nn.Module):
    """An Any4Linear's weights, W4A8 math."""

    def __init__(self, m: Any4Linear):
        super().__init__()
        self.g = m.group_size
        self.packed = w4a8_pack(m.qweight, m.lut, m.scales, m.zeros, m.group_size)

    def forward(self, x):
        p = self.packed
        return torch.ops.pocketllm.any4_linear_w4a8(x.contiguous(), p["qweight"], p["lut_i8"], p["lut_scale"],
                                                    p["scales"], p["zeros"], self.g)


def any4_linears(model: nn.Module) -> dict[str, Any4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Any4Linear)}


def swap_to_w4a8(model: nn.Module) -> None:
    for name, m in any4_linears(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, W4A8Linear(m))


def windows(ids: list[int], bos: int | None, context: int) -> list[list[int]]:
    step = context - 1 if bos is not None else context
    out = []
    for start in range(0, len(ids), step):
        w = ([bos] if bos is not None else []) + ids[start:start + step]
        if len(w) >= 2:
            out.append(w)
    return out


@torch.no_grad()
def log_probs(model, win: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([win]), None)[0, :-1].double()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--any4", type=Path, required=True, help="an any4 checkpoint (pocketllm quantize --scheme any4)")
    ap.add_argument("--fp32", type=Path, default=None, help="the float checkpoint it came from (optional)")
    ap.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "austen" / "persuasion.txt",
                    help="held-out text (default: shared/data/austen/persuasion.txt beside the repository)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens from the start of the text")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "w4a8_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    exact, ckpt = load_model(args.any4, dtype="fp32")
    w4a8, _ = load_model(args.any4, dtype="fp32")
    swap_to_w4a8(w4a8)
    fp32 = load_model(args.fp32, dtype="fp32")[0] if args.fp32 else None
    spec = ckpt.spec
    tok = load_tokenizer(ckpt.dir, spec.bos_token_id)
    ids = tok.tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False).ids[:args.tokens]
    wins = windows(ids, spec.bos_token_id, args.context)

    # per layer: the exact model's inputs to each any4 linear, both maths on them
    packed = {name: W4A8Linear(m) for name, m in any4_linears(exact).items()}
    err2 = {name: 0.0 for name in packed}
    ref2 = {name: 0.0 for name in packed}

    def hook(name):
        def fn(module, inputs, output):
            y = packed[name](inputs[0])
            err2[name] += float((y.double() - output.double()).pow(2).sum())
            ref2[name] += float(output.double().pow(2).sum())
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in any4_linears(exact).items()]
    kl, kl_fp32_any4, kl_fp32_w4a8 = 0.0, 0.0, 0.0
    agree, agree_fp32_any4, agree_fp32_w4a8 = 0, 0, 0
    nll_any4, nll_w4a8, count = 0.0, 0.0, 0
    for win in wins:
        lp_a, lp_w = log_probs(exact, win), log_probs(w4a8, win)
        target = torch.tensor(win[1:])
        kl += float((lp_a.exp() * (lp_a - lp_w)).sum())
        agree += int((lp_a.argmax(-1) == lp_w.argmax(-1)).sum())
        nll_any4 -= float(lp_a.gather(1, target[:, None]).sum())
        nll_w4a8 -= float(lp_w.gather(1, target[:, None]).sum())
        if fp32 is not None:
            lp_f = log_probs(fp32, win)
            kl_fp32_any4 += float((lp_f.exp() * (lp_f - lp_a)).sum())
            kl_fp32_w4a8 += float((lp_f.exp() * (lp_f - lp_w)).sum())
            agree_fp32_any4 += int((lp_f.argmax(-1) == lp_a.argmax(-1)).sum())
            agree_fp32_w4a8 += int((lp_f.argmax(-1) == lp_w.argmax(-1)).sum())
        count += len(win) - 1
    for h in handles:
        h.remove()

    layers = {name: math.sqrt(err2[name] / ref2[name]) for name in packed}
    kinds: dict[str, list[float]] = {}
    for name, e in layers.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(e)
    result = {
        "command": " ".join(["benchmarks/w4a8_quality.py", *sys.argv[1:]]),
        "checkpoint": str(args.any4), "text": args.text.name, "tokens": count, "windows": len(wins),
        "context": args.context,
        "kl_any4_to_w4a8": kl / count, "top1_agreement_any4_w4a8": agree / count,
        "ppl_any4": math.exp(nll_any4 / count), "ppl_w4a8": math.exp(nll_w4a8 / count),
        "layer_rel_error": {"mean": sum(layers.values()) / len(layers), "max": max(layers.values()),
                            "by_kind_mean": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                            "per_layer": layers},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if fp32 is not None:
        result.update(kl_fp32_to_any4=kl_fp32_any4 / count, kl_fp32_to_w4a8=kl_fp32_w4a8 / count,
                      top1_agreement_fp32_any4=agree_fp32_any4 / count,
                      top1_agreement_fp32_w4a8=agree_fp32_w4a8 / count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{count} tokens in {len(wins)} windows of {args.context}: KL(any4 || w4a8) = {result['kl_any4_to_w4a8']:.5f}"
          f" nats/token, top-1 agreement {result['top1_agreement_any4_w4a8']:.4f}, perplexity any4 "
          f"{result['ppl_any4']:.3f} vs w4a8 {result['ppl_w4a8']:.3f}")
    if fp32 is not None:
        print(f"vs fp32: KL(fp32 || any4) = {result['kl_fp32_to_any4']:.5f}, KL(fp32 || w4a8) = "
              f"{result['kl_fp32_to_w4a8']:.5f}; top-1 agreement with fp32 {result['top1_agreement_fp32_any4']:.4f}"
              f" (any4) vs {result['top1_agreement_fp32_w4a8']:.4f} (w4a8)")
    print("per-layer relative output error, mean by kind: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result["layer_rel_error"]["by_kind_mean"].items())
          + f"; all layers mean {result['layer_rel_error']['mean']:.4f}, max {result['layer_rel_error']['max']:.4f}")


if __name__ == "__main__":
    main()
