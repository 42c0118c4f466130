"""The gated MLP: down(act(gate(x)) * up(x)), parameterised by its activation (SiLU: SwiGLU, ReLU: ReGLU) and by
the upstream names of its three projections (MiniCPM4 `gate_proj/up_proj/down_proj`, SmallThinker's experts
`gate/up/down`, MiniMax's experts `w1/w3/w2`), so every family's state dict loads without renaming."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str = "silu",
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.activation = activation
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=False))

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down), whatever upstream calls them."""
        return tuple(self._modules[n] for n in self.names)

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """act(g) * u (a target may set a fused op in its place: swaps.use_fused_elementwise)."""
        return ACTIVATIONS[self.activation](g) * u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.glu(gate(x), up(x)))
