"""How far the W4A8 numpy reference moves when its inputs move by fp32 rounding-sized amounts.

W4A8 rounds every decoder layer's activations to int8; an activation within a rounding boundary of x.5 flips to the
neighbouring integer under any tiny change of its input, and a flip in one layer propagates. The kernel computes
norms, RoPE and attention in a different fp32 summation order than the numpy reference (XNNPACK partitions), so this
measures the size of the model-level differences to expect from that alone: the reference against itself with the
RMSNorm weights multiplied by (1 + eps * N(0, 1)), for fp32 activations (exact any4) and int8 activations (W4A8).

    .venv/bin/python benchmarks/w4a8_sensitivity.py BUNDLE [--eps 1e-7,1e-6,1e-5] [--tokens 90]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from pocketllm.runtime_py.model import ReferenceModel  # noqa: E402


def logits(reference: Path, activations: str, eps: float, ids: np.ndarray) -> np.ndarray:
    model = ReferenceModel.from_checkpoint(reference, max_context=len(ids) + 1, activations=activations)
    if eps:
        rng = np.random.default_rng(1)
        model.input_norms = [(n * (1 + eps * rng.standard_normal(n.shape))).astype(np.float32)
                             for n in model.input_norms]
    return model.forward(ids, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="a bundle whose reference/ holds any4 weights")
    ap.add_argument("--eps", default="1e-7,1e-6,1e-5", help="relative noise levels, comma-separated")
    ap.add_argument("--tokens", type=int, default=90)
    args = ap.parse_args()
    ids = np.array([1, *np.random.default_rng(0).integers(10, 1000, args.tokens)], dtype=np.int64)
    reference = args.bundle / "reference"
    print("activations  eps      max|delta logit|  positions within 1e-3")
    for activations in ("fp32", "int8"):
        base = logits(reference, activations, 0.0, ids)
        for eps in (float(e) for e in args.eps.split(",")):
            d = np.abs(base - logits(reference, activations, eps, ids)).max(axis=-1)
            print(f"{activations:11s}  {eps:7.0e}  {d.max():16.3e}  {(d <= 1e-3).mean():8.3f}")


if __name__ == "__main__":
    main()
