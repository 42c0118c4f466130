"""numpy twins of pocketllm's custom ops (export/ops/<op>.py), one file per op, written from the docs
(MODELS.md, docs/*.md) rather than from the torch code they check."""
