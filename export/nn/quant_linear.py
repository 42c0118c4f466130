"""Linear layers over packed quantized weights (docs/quantization.md), swapped in for nn.Linear at load time.

Differences from nn.Linear: no bias; the weight is never stored in floating point. Buffers hold the packed tensors
exactly as the checkpoint stores them (uint8 / int8 codes, fp16 scales, zeros and LUT), under the checkpoint's
names (`qweight`, `scales`, `zeros`, `lut`), so a quantized state dict loads without renaming. `weight` is a
property that dequantizes (fp32), for code that reads a Linear's weight directly (a tied or fp32 LM head).

- Any4Linear: calls `pocketllm::any4_linear` (export/ops/any4_linear.py), the op exporters lower.
- Int4Linear (int4, nf4): packed 4-bit codes into a fixed 16-entry table (int4: c - 8 with a zero; nf4: the NF4
  codebook, no zero), dequantized with the same aten arithmetic as any4 and fed to F.linear; backends map it
  to their native 4-bit paths (ONNX MatMulNBits, XNNPACK) rather than to the LUT op.
- Int8Linear: per-channel symmetric int8, through `pocketllm::int8_linear` (export/ops/int8_linear.py: fp32
  activations, exact; the LM head's op).
- QuantEmbedding: a packed embedding table (any scheme): `forward(tokens)` gathers the tokens' rows of the packed
  tensors and dequantizes only those (the reference's arithmetic, bit for bit); `linear(x)` is the matmul of a tied
  LM head over the same packed tensors, so the table is stored once.
- Any4W4A8Linear: an any4 layer run with int8 activations (`pocketllm::any4_linear_w4a8`,
  export/ops/any4_linear_w4a8.py), packed at export from an Any4Linear (`use_w4a8`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pocketllm.export.ops  # noqa: F401  (registers pocketllm custom ops)
from pocketllm.export.ops.any4_linear import any4_dequantize
from pocketllm.export.quant.format import QuantConfig, TensorQuant
from pocketllm.export.quant.nf4 import NF4

INT4_TABLE = tuple(float(c - 8) for c in range(16))
NF4_TABLE = NF4  # QLoRA's NormalFloat-4 codebook (runtime_py/quant.py keeps its own copy)


class _Packed(nn.Module):
    def __init__(self, in_features: int, out_features: int, quant: TensorQuant):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.scheme = quant.scheme
        self.group_size = quant.group(in_features)  # actual group length (in_features for one group per row)
        for suffix, (dtype, shape) in quant.packed(out_features, in_features).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=_TORCH_DTYPES[dtype]))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, fp32 [out_features, in_features]."""
        return dequantize_module(self)

    def extra_repr(self) -> str:
        g = self.quant.group_size or "row"
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, group={g}"


class Any4Linear(_Packed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pocketllm.any4_linear(x, self.qweight, self.lut, self.scales, self.zeros, self.group_size)


class Int4Linear(_Packed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Int8Linear(_Packed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pocketllm.int8_linear(x, self.qweight, self.scales)


class QuantEmbedding(_Packed):
    """`model.embed_tokens` stored packed ([vocab, hidden] as a [N, K] = [vocab, hidden] weight). Gathered rows come
    out in `out_dtype` (the model's compute dtype, set by load_model; the dequantization itself is fp32)."""

    out_dtype: torch.dtype = torch.float32

    def __init__(self, num_embeddings: int, embedding_dim: int, quant: TensorQuant):
        super().__init__(embedding_dim, num_embeddings, quant)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = {name: F.embedding(flat, buf) for name, buf in self.named_buffers(recurse=False)}
        w = dequantize_packed(self.quant, rows, self.embedding_dim)  # [T, hidden] fp32, row by row as the table
        return w.reshape(*tokens.shape, self.embedding_dim).to(self.out_dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table.T (the tied LM head) with the scheme's linear op on the same buffers."""
        return _CLASSES[self.scheme].forward(self, x)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}, group={self.quant.group_size or 'row'}"


class Any4W4A8Linear(nn.Module):
    """An any4 layer with W4A8 numerics (docs/quantization.md, "W4A8"): int8 LUT + fp32 LUT scale per row, the
    checkpoint's codes, fp16 scales and zeros in 8-row blocks (w4a8_pack). fp32 activations in and out."""

    def __init__(self, src: "Any4Linear"):
        super().__init__()
        from pocketllm.export.ops.any4_linear_w4a8 import w4a8_pack

        self.in_features, self.out_features, self.group_size = src.in_features, src.out_features, src.group_size
        self.quant = src.quant
        for name, t in w4a8_pack(src.qweight, src.lut, src.scales, src.zeros, src.group_size).items():
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pocketllm.any4_linear_w4a8(x.to(torch.float32), self.qweight, self.lut_i8, self.lut_scale,
                                                    self.scales, self.zeros, self.group_size).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, any4 W4A8, group={self.group_size}"


W4A8_SCOPE = "model.layers."  # which any4 layers W4A8 runs: the decoder layers' (embedding and LM head stay exact)


def use_w4a8(model: nn.Module, prefix: str = W4A8_SCOPE) -> list[str]:
    """Swap every Any4Linear whose name starts with `prefix` for its Any4W4A8Linear twin, in place. Returns the
    swapped module names (what the numpy reference must run with W4A8 numerics: runtime_py/quant.py)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Any4Linear) and name.startswith(prefix):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, Any4W4A8Linear(module))
            swapped.append(name)
    return swapped


_TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16}
_CLASSES = {"any4": Any4Linear, "int4": Int4Linear, "nf4": Int4Linear, "int8": Int8Linear}


def dequantize_packed(quant: TensorQuant, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """fp32 [N, K] from the packed tensors of one module (suffix -> tensor), as the model computes it."""
    g = quant.group(in_features)
    q = tensors["qweight"]
    N = q.shape[0]
    if quant.scheme == "int8":
        return q.to(torch.float32) * tensors["scales"].to(torch.float32)
    if quant.scheme == "any4":
        return any4_dequantize(q, tensors["lut"], tensors["scales"], tensors["zeros"], g)
    table = torch.tensor(INT4_TABLE if quant.scheme == "int4" else NF4_TABLE, dtype=torch.float32)
    zeros = tensors["zeros"] if quant.scheme == "int4" else torch.zeros_like(tensors["scales"])
    return any4_dequantize(q, table.expand(N, 16), tensors["scales"], zeros, g)


def dequantize_module(m: _Packed) -> torch.Tensor:
    tensors = {name: buf for name, buf in m.named_buffers(recurse=False)}
    return dequantize_packed(m.quant, tensors, m.in_features)


def make_quant_linear(quant: TensorQuant, in_features: int, out_features: int) -> _Packed:
    return _CLASSES[quant.scheme](in_features, out_features, quant)


def swap_quantized_linears(model: nn.Module, config: QuantConfig) -> None:
    """Replace every module `config` lists (nn.Linear or nn.Embedding, upstream names) by its packed twin, in place.

    Call on the meta-device model before loading the state dict; new buffers are created on the same device.
    """
    for name, quant in config.modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr, None)
        N, K = config.shapes[name]
        device = old.weight.device if isinstance(old, (nn.Linear, nn.Embedding)) else torch.device("cpu")
        with torch.device(device):
            if isinstance(old, nn.Embedding):
                setattr(parent, attr, QuantEmbedding(N, K, quant))
            else:
                setattr(parent, attr, make_quant_linear(quant, K, N))
