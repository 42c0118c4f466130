"""Loading streams weights: a bf16 0.5B checkpoint loads into the torch model below 2.5x its size in peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys

from pocketllm.export.init_checkpoint import init_checkpoint

MEASURE = """
import json, resource, sys, torch
from pocketllm.export.nn import load_model
model, ckpt = load_model(sys.argv[1], max_context=256)
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": n,
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def test_half_billion_preset_loads_within_2_5x_checkpoint_size(tmp_path):
    d = init_checkpoint("minicpm4", "0.5b", tmp_path / "m05", dtype="bf16")
    size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert (d / "model.safetensors.index.json").is_file()  # the 0.5b preset is sharded like upstream
    out = subprocess.run([sys.executable, "-c", MEASURE, str(d)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.40e9 < result["params"] < 0.60e9
    assert result["dtype"] == "torch.bfloat16"
    ratio = result["peak_rss"] / size
    print(f"checkpoint {size / 2**30:.2f} GiB, peak RSS {result['peak_rss'] / 2**30:.2f} GiB, ratio {ratio:.2f}")
    assert ratio < 2.5
