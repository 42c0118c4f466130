"""ExecuTorch's own C++ LLM runner (`executorch.extension.llm.runner.TextLLMRunner`) on a pocketllm bundle, with our
kernel library loaded, against `pocketllm generate --engine executorch` (greedy). Prints both texts; exit 1 if they
differ.

    .venv/bin/python benchmarks/llm_runner_check.py out/tiny-austen-any4 --prompt "It is a truth" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prompt", default="It is a truth universally acknowledged")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from pocketllm.export.bundle.manifest import read_manifest
    from pocketllm.runtime_py.runners.executorch import load_kernel_library, load_llama_ops

    manifest = read_manifest(args.bundle)
    target = manifest["targets"]["executorch"]
    if any(op.startswith("llama::") for op in target["operators"]):
        load_llama_ops()
    if target["custom_ops"]:
        load_kernel_library(needed=target["custom_ops"])
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pieces: list[str] = []
    runner = TextLLMRunner(str(args.bundle / target["file"]), str(args.bundle / "tokenizer.json"))
    num_bos = manifest["tokenizer"].get("num_bos", 0)
    runner.generate(args.prompt, GenerationConfig(echo=False, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                                  num_bos=num_bos), token_callback=pieces.append)
    theirs = args.prompt + "".join(pieces)
    proc = subprocess.run([sys.executable, "-m", "pocketllm.export.cli.main", "generate", "--engine", "executorch", "--bundle",
                           str(args.bundle), "--prompt", args.prompt, "--greedy", "--max-new-tokens",
                           str(args.max_new_tokens)], capture_output=True, text=True, cwd=REPO)
    ours = proc.stdout[:-1]  # prompt + continuation + "\n" (the speed goes to stderr)
    print(f"ExecuTorch TextLLMRunner: {theirs!r}")
    print(f"pocketllm generate:       {ours!r}")
    same = theirs == ours
    print("identical" if same else "DIFFERENT")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
