"""Numpy twins of pocketllm's custom ops, one file per op, named like the op (export/ops/<op>.py): written from the
documented math (MODELS.md, docs/), independently of the torch code they check."""
