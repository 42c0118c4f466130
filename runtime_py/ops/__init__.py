"""numpy twins of pocketllm's custom ops, one file per op (same stem as export/ops/<op>.py), written from the ops'
definitions without importing their torch code."""
