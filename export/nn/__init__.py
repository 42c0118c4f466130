"""The torch model: one decoder built from a ModelSpec (blocks in separate files, loader in load.py)."""

from pocketllm.export.nn.decoder import CausalLM
from pocketllm.export.nn.load import load_model

__all__ = ["CausalLM", "load_model"]
