"""Build a CausalLM for a checkpoint without ever holding two full copies of the weights.

The model is built on the meta device, given uninitialised storage, then each parameter is *assigned* the tensor
read from the checkpoint (shard by shard, memory-mapped), so peak memory is about one model plus one shard.
"""

from __future__ import annotations

import torch

from pocketllm.export.checkpoint import Checkpoint, open_checkpoint
from pocketllm.export.defaults import resolve_max_context
from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.decoder import CausalLM
from pocketllm.export.nn.kv_cache import KVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_model(checkpoint, max_context: int | None = None, dtype: str | torch.dtype | None = None) -> tuple[CausalLM, Checkpoint]:
    """checkpoint: a directory or an opened Checkpoint. dtype None keeps the checkpoint's storage dtype."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    spec = ckpt.spec
    max_context = resolve_max_context(spec, max_context)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or SAFETENSORS_DTYPES.get(ckpt.weight_dtype, torch.float32)

    with torch.device("meta"):
        model = CausalLM(spec, max_context)
    if ckpt.quantization is not None:  # packed modules for quantized weights (export/nn/quant_linear.py)
        from pocketllm.export.nn.quant_linear import swap_quantized_linears

        swap_quantized_linears(model, ckpt.quantization)
    model = model.to_empty(device="cpu")
    wanted = set(model.state_dict())  # parameters + persistent buffers (packed quantized tensors)
    state = {}
    for name, tensor in ckpt.iter_tensors(names=[n for n in ckpt.weight_map if n in wanted], dtype=dtype):
        state[name] = tensor  # packed tensors keep their stored dtypes (iter_tensors leaves them alone)
    model.load_state_dict(state, strict=True, assign=True)
    for cache in model.modules():
        if isinstance(cache, KVCache):
            cache.reset(dtype)  # real storage, in the compute dtype
    for module in model.modules():  # buffers computed from the spec (lightning decay rates and state)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.model.rotary.cos = torch.empty(model.model.rotary.cos.shape)
    model.model.rotary.sin = torch.empty(model.model.rotary.sin.shape)
    model.model.rotary.reset_tables()
    for p in model.parameters():
        p.requires_grad_(False)
    from pocketllm.export.nn.quant_linear import QuantEmbedding

    for module in model.modules():  # a packed embedding table hands out rows in the compute dtype
        if isinstance(module, QuantEmbedding):
            module.out_dtype = dtype
    return model.eval(), ckpt
