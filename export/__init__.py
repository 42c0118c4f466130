"""pocketllm export side: checkpoint reading, the torch model, custom ops, quantization and phone targets."""
