"""Runners: run an exported artifact with the engine protocol of the reference model,
`forward(tokens int64 [T], start_pos) -> logits float32 [T, vocab]` and `reset()`."""
