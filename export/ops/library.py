"""The `pocketllm` torch.library namespace shared by all custom ops."""

import torch

NAMESPACE = "pocketllm"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
