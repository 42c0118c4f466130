"""The coremltools converters of the Core ML target: one per op it lowers (ops.py says which), each emitting MIL.
This file imports coremltools: import it only from lower.py (registration happens on import).

    pocketllm::any4_linear                  constexpr_lut_to_dense (per-row LUT) + group scales and zeros applied to
                                            per-group partial sums (`quantized_linear_mil`)
    pocketllm::infllm_attention             composite MIL, compressed keys recomputed from the K cache each call
                                            (the swapped model calls the stateful marker below instead)
    pocketllm::lightning_attention          block form in MIL, state in and out
    pocketllm_coreml::quantized_linear      (int8 / int4 / nf4) constexpr_blockwise_shift_scale / constexpr_lut_to_dense
    pocketllm_coreml::infllm_attention      composite MIL with the compressed keys kept in a state
    pocketllm_coreml::moe_routed_experts    one `cond` per expert: only the routed experts run

Weights as stored (bits per weight as stored = docs/quantization.md's, everything included):
    int8   constexpr_blockwise_shift_scale(int8 [N, K], scale fp16 [N, 1])                       -> linear
    int4   constexpr_blockwise_shift_scale(int4 c-8 [N, K], scale fp16 [N, G])  -> linear, + zeros term
    any4   constexpr_lut_to_dense(uint4 [G, N, g], lut fp16 [1, N, 1, 16, 1]) -> per-group matmul [G, M, N],
           scaled by s [G, 1, N] and summed over groups, + zeros term
           (one group per row: the LUT is lut * s + z, uint4 [N, K] + lut [N, 1, 16, 1] -> linear; 4 + 256/K bits)
    nf4    as any4 with one shared LUT [1, 1, 1, 16, 1] (the NF4 codebook in fp16), no zeros
    zeros term: sum_g z[n, g] * sum(x over group g)  (exact: W = base + z per group, x.W = x.base + sum_g z_g sum x_g)
The zeros cannot ride inside constexpr_blockwise_shift_scale exactly (its offset is in code units: z / s is not an
fp16 value in general), and folding any4's scales into per-group LUTs costs 16 fp16 per (row, group), +2 bits per
weight at g = 128: partial sums keep the stored weights at the checkpoint's own size.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
from coremltools.converters.mil.mil import types

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.quant_linear import NF4_TABLE
from pocketllm.export.ops.infllm_attention import SCORE_RULE_CODES
from pocketllm.export.targets.coreml.swaps import MASKED, compressed_key_window, split_expert_tensors

RULES = {code: name for name, code in SCORE_RULE_CODES.items()}  # op argument -> "upstream" / "exact"
NO_COARSE_SCORE = 1.0e4  # upstream rule, query that sees no coarse kernel yet: every visible kernel ties (+inf)


# ---------------------------------------------------------------------------------------------- small helpers
def _np(var) -> np.ndarray:
    """Value of a const input (weights and buffers are consts in the converted graph)."""
    if var is None or var.val is None:
        raise PocketllmError("Core ML converter: expected a constant weight tensor, got a computed one")
    return np.asarray(var.val)


def _fp16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def _f32(x):
    """The frontend graph is fp32 (the fp16 pass rewrites it later); constexpr weights are fp16 at the source."""
    return mb.cast(x=x, dtype="fp32")


def _i32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int32)


def _index_vector(*items):
    """int32 [n] from python ints and int32 scalar vars (no concat of rank-0 values)."""
    parts = [mb.expand_dims(x=i, axes=[0]) if not isinstance(i, int) else _i32([i]) for i in items]
    return mb.concat(values=parts, axis=0)


def unpack_codes(qweight: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> uint8 [N, K] codes, low nibble first (docs/quantization.md)."""
    q = qweight.astype(np.uint8)
    return np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], -1)


# ---------------------------------------------------------------------------------------------- linears
def weight_bits(arrays: dict[str, np.ndarray]) -> int:
    """Bits the constexpr inputs of one linear occupy in the weight file (uint4/int4 count 4 bits)."""
    bits = 0
    for a in arrays.values():
        meta = getattr(a.dtype, "metadata", None) or {}
        width = 4 if meta else a.dtype.itemsize * 8
        bits += a.size * width
    return bits


def quantized_weight_arrays(scheme: str, group: int, tensors: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The exact arrays the package stores for one linear (shapes/dtypes in the module docstring)."""
    if scheme == "int8":
        q, s = tensors
        return {"data": q.astype(np.int8), "scale": _fp16(s).reshape(-1, 1)}
    codes = unpack_codes(tensors[0])
    N, K = codes.shape
    G = K // group
    if scheme == "int4":
        s, z = _fp16(tensors[1]).reshape(N, G), _fp16(tensors[2]).reshape(N, G)
        data = (codes.astype(np.int8) - 8).astype(types.np_int4_dtype)
        return {"data": data, "scale": s, "zeros": z}
    if scheme == "any4" and G == 1:
        # one group per row: lut * s + z is still a 16-entry table per row (computed as the checkpoint does, fp32
        # multiply then add, rounded once to fp16): plain per-row palettization, 4 + 256/K bits, a plain linear
        lut = tensors[1].astype(np.float32).reshape(N, 16)
        folded = lut * tensors[2].astype(np.float32).reshape(N, 1) + tensors[3].astype(np.float32).reshape(N, 1)
        return {"indices": codes.astype(types.np_uint4_dtype), "lut": _fp16(folded).reshape(N, 1, 16, 1)}
    if scheme == "any4":
        lut = _fp16(tensors[1]).reshape(N, 16)
        s, z = _fp16(tensors[2]).reshape(N, G), _fp16(tensors[3]).reshape(N, G)
    elif scheme == "nf4":
        lut, s, z = _fp16(NF4_TABLE).reshape(1, 16), _fp16(tensors[1]).reshape(N, G), None
    else:
        raise PocketllmError(f"Core ML cannot store scheme {scheme!r}")
    # [G, N, g] indices: the constexpr output is already the per-group batch layout (no runtime transpose).
    indices = codes.reshape(N, G, group).transpose(1, 0, 2).astype(types.np_uint4_dtype)
    out = {"indices": indices, "lut": lut.reshape(1, lut.shape[0], 1, 16, 1), "scale": s}
    if z is not None:
        out["zeros"] = z
    return out


def quantized_weight_vars(scheme: str, group: int, tensors: list[np.ndarray], name: str, dtype: str = "fp32") -> dict:
    """The weight ops of one linear: constexpr ops (quantized) or a const (none), plus the scale/zero consts.
    dtype: of the plain consts (the fp32 frontend graph's, or fp16 for consts read inside a `cond` block: a cast of
    a const there would be folded into a new const inside the block, which the functions cannot share)."""
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    if scheme == "none":
        return {"weight": mb.const(val=np.asarray(tensors[0], dtype=np.float32).astype(np_dtype), name=f"{name}_weight")}
    arr = quantized_weight_arrays(scheme, group, tensors)
    out = {}
    if scheme in ("int8", "int4"):
        out["weight"] = mb.constexpr_blockwise_shift_scale(data=arr["data"], scale=arr["scale"], name=f"{name}_weight")
    else:
        out["weight"] = mb.constexpr_lut_to_dense(indices=arr["indices"], lut=arr["lut"], name=f"{name}_weight")
        if "scale" in arr:  # per-group scales, applied to the partial sums
            G, N = arr["indices"].shape[0], arr["scale"].shape[0]
            scales = np.ascontiguousarray(arr["scale"].T).reshape(G, 1, N)
            out["scales"] = mb.const(val=scales.astype(np_dtype), name=f"{name}_scales")
    if "zeros" in arr:
        out["zeros"] = mb.const(val=np.ascontiguousarray(arr["zeros"].T).astype(np_dtype), name=f"{name}_zeros")  # [G, N]
    return out


def quantized_matmul_mil(x, scheme: str, group: int, w: dict, name: str, dtype: str = "fp32"):
    """y = x @ W.T for x [..., K] with W from `quantized_weight_vars(..., dtype)`, computed in dtype (x is cast to
    it; the result is dtype)."""
    shape = list(x.shape)
    K = shape[-1]
    M = int(np.prod(shape[:-1]))
    if x.dtype != (types.fp16 if dtype == "fp16" else types.fp32):
        x = mb.cast(x=x, dtype=dtype)
    wide = (lambda v: v) if dtype == "fp16" else _f32  # constexpr outputs are fp16
    x2 = mb.reshape(x=x, shape=[M, K])
    if scheme == "none":
        y = mb.matmul(x=x2, y=w["weight"], transpose_y=True)
    elif scheme in ("int8", "int4") or "scales" not in w:  # [N, K] weight (blockwise, or any4 folded per row)
        y = mb.matmul(x=x2, y=wide(w["weight"]), transpose_y=True) if dtype == "fp16" else \
            mb.linear(x=x2, weight=wide(w["weight"]))
    else:
        G, _, N = w["scales"].shape
        xg = mb.transpose(x=mb.reshape(x=x2, shape=[M, G, group]), perm=[1, 0, 2])  # [G, M, g]
        partial = mb.matmul(x=xg, y=wide(w["weight"]), transpose_y=True)  # [G, M, N]: one dot per group
        y = mb.reduce_sum(x=mb.mul(x=partial, y=w["scales"]), axes=[0], keep_dims=False)  # [M, N]
    if "zeros" in w:  # sum_g z[n, g] * sum(x over group g)
        G = w["zeros"].shape[0]
        xs = mb.reduce_sum(x=mb.reshape(x=x2, shape=[M, G, group]), axes=[-1], keep_dims=False)  # [M, G]
        y = mb.add(x=y, y=mb.matmul(x=xs, y=w["zeros"]))
    return mb.reshape(x=y, shape=shape[:-1] + [y.shape[-1]], name=name)


def quantized_linear_mil(x, scheme: str, group: int, tensors: list[np.ndarray], name: str):
    return quantized_matmul_mil(x, scheme, group, quantized_weight_vars(scheme, group, tensors, name), name)


@register_torch_op(torch_alias=["pocketllm::any4_linear"], override=True)
def pocketllm_any4_linear(context, node):
    x, qweight, lut, scales, zeros, group = _get_inputs(context, node, expected=6)
    tensors = [_np(qweight), _np(lut), _np(scales), _np(zeros)]
    context.add(quantized_linear_mil(x, "any4", int(group.val), tensors, node.name), torch_name=node.name)


@register_torch_op(torch_alias=["pocketllm_coreml::quantized_linear"], override=True)
def pocketllm_coreml_quantized_linear(context, node):
    x, qweight, scales, zeros, scheme, group = _get_inputs(context, node, expected=6)
    scheme = scheme if isinstance(scheme, str) else str(scheme.val)
    tensors = [_np(qweight), _np(scales)] + ([_np(zeros)] if zeros is not None else [])
    context.add(quantized_linear_mil(x, scheme, int(group.val), tensors, node.name), torch_name=node.name)


# ---------------------------------------------------------------------------------------------- InfLLM v2
def compressed_keys_from_rows(rows, n_kernels: int, kernel_size: int, kernel_stride: int):
    """rows [R, Hkv, D] (R >= stride*(n-1)+size) -> Kc [n, Hkv, D]: mean of each window of kernel_size rows."""
    index = (kernel_stride * np.arange(n_kernels)[:, None] + np.arange(kernel_size)[None, :]).reshape(-1)
    windows = mb.gather(x=rows, indices=_i32(index), axis=0)  # [n*size, Hkv, D]
    Hkv, D = rows.shape[1], rows.shape[2]
    windows = mb.reshape(x=windows, shape=[n_kernels, kernel_size, Hkv, D])
    return mb.reduce_mean(x=windows, axes=[1], keep_dims=False)


def update_compressed_keys_mil(k_cache, kc_state, start, T: int, kernel_size: int, kernel_stride: int):
    """Recompute the kernels this call may complete (swaps.compressed_key_start/window, same arithmetic) from the
    updated K cache and write them into the compressed-key state. Returns the new state value [1, NK, Hkv, D]."""
    _, S, Hkv, D = k_cache.shape
    nk = kc_state.shape[1]
    m = compressed_key_window(T, nk, kernel_stride)
    span = kernel_stride * (m - 1) + kernel_size
    j0 = mb.floor_div(x=mb.add(x=start, y=np.int32(kernel_stride - kernel_size)), y=np.int32(kernel_stride))
    j0 = mb.minimum(x=mb.maximum(x=j0, y=np.int32(0)), y=np.int32(nk - m))
    row0 = mb.mul(x=j0, y=np.int32(kernel_stride))
    rows = mb.slice_by_size(x=k_cache, begin=_index_vector(0, row0, 0, 0), size=_i32([1, span, Hkv, D]))
    kc_new = compressed_keys_from_rows(mb.squeeze(x=rows, axes=[0]), m, kernel_size, kernel_stride)  # [m, Hkv, D]
    kc_begin = _index_vector(0, j0, 0, 0)
    kc_end = _index_vector(1, mb.add(x=j0, y=np.int32(m)), Hkv, D)
    return mb.slice_update(x=kc_state, update=mb.expand_dims(x=kc_new, axes=[0]), begin=kc_begin, end=kc_end)


def kernel_scores(logits, visible, rule: str, coarse=None):
    """THE scoring step (the only place the InfLLM v2 rule lives; docs/infllm_v2.md step 3). Per KV head group:

    logits [Hkv, T, G, NK] = q . Kc1 / sqrt(d); visible [T, NK] bool (kernel j complete before query t).
    rule "exact": p = softmax over the visible kernels.
    rule "upstream" (what upstream trains and serves): p = exp(logit - LSE), LSE the log-sum-exp of q . Kc2 / sqrt(d)
    over the visible coarse kernels (coarse = (coarse_logits [Hkv, T, G, NK2], coarse_visible [T, NK2])); a query
    that sees no coarse kernel yet scores every visible kernel alike (the reference's +inf: ties to the lower block;
    with init + local blocks forced such queries have every valid block selected anyway).
    Returns the group score [Hkv, T, NK]: sum over the G query heads (invisible kernels: ignore, masked later).
    """
    vis = mb.expand_dims(x=mb.expand_dims(x=visible, axes=[0]), axes=[2])  # [1, T, 1, NK]
    masked = mb.select(cond=vis, a=logits, b=np.float32(MASKED))
    if rule == "exact":
        p = mb.softmax(x=masked, axis=-1)
    elif rule == "upstream":
        coarse_logits, coarse_visible = coarse
        cvis = mb.expand_dims(x=mb.expand_dims(x=coarse_visible, axes=[0]), axes=[2])  # [1, T, 1, NK2]
        lse = mb.reduce_log_sum_exp(x=mb.select(cond=cvis, a=coarse_logits, b=np.float32(MASKED)),
                                    axes=[-1], keep_dims=True)
        any_coarse = mb.reduce_max(x=mb.cast(x=coarse_visible, dtype="fp32"), axes=[-1], keep_dims=True)  # [T, 1]
        has = mb.greater(x=mb.expand_dims(x=mb.expand_dims(x=any_coarse, axes=[0]), axes=[2]), y=np.float32(0.5))
        p = mb.select(cond=has, a=mb.exp(x=mb.sub(x=masked, y=lse)), b=np.float32(NO_COARSE_SCORE))
        p = mb.select(cond=vis, a=p, b=np.float32(0.0))
    else:
        raise PocketllmError(f"unknown InfLLM v2 score rule {rule!r}")
    return mb.reduce_sum(x=p, axes=[2], keep_dims=False)


def touching_kernels(n_blocks: int, n_kernels: int, kernel_size: int, kernel_stride: int, block_size: int):
    """Const tables: kernel index [NB, R] (clamped) and ok [NB, R]: kernel j touches block b when
    s*j <= B*b + B - 1 and s*j + k - 1 >= B*b (docs/infllm_v2.md step 4)."""
    b = np.arange(n_blocks)
    lo = np.maximum(0, -((kernel_size - 1 - block_size * b) // kernel_stride))
    hi = np.minimum(n_kernels, (block_size * b + block_size - 1) // kernel_stride + 1)
    R = max(1, int((hi - lo).max()))
    j = lo[:, None] + np.arange(R)[None, :]
    ok = j < hi[:, None]
    return np.minimum(j, n_kernels - 1), ok


def infllm_attention_mil(q, k_cache, v_cache, kc, start, n_valid, p: dict, rule: str, name: str):
    """Composite InfLLM v2 over the whole static cache. q [1, T, Hq, D]; caches [1, S, Hkv, D] (this call's rows
    written); kc [1, NK, Hkv, D] compressed keys (complete ones final); start, n_valid int32 scalars.

    Stages: kernel scores (q . Kc, `kernel_scores`) -> block scores (max over touching kernels, const gather) ->
    forced blocks (init + local window) + top-k of the other valid blocks (mb.topk, k static) -> attention:
    T > 1: one masked softmax over the whole cache (cost O(T * S), as dense); T == 1 (decode): gather of the
    selected blocks only (cost O(k * block) + O(S / stride) for scoring, independent of dense attention's O(S)).
    Dense fallback (real length < dense_len) selects every valid block. Returns [1, T, Hq, D]."""
    _, T, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    NK = kc.shape[1]
    G = Hq // Hkv
    ks, st, bs = p["kernel_size"], p["kernel_stride"], p["block_size"]
    init, local, topk, dense_len = p["init_blocks"], p["window_size"] // p["block_size"], p["topk"], p["dense_len"]
    NB = -(-S // bs)
    scale = np.float32(1.0 / math.sqrt(D))

    pos = mb.add(x=_i32(np.arange(T)), y=start)  # [T]
    pos_col = mb.expand_dims(x=pos, axes=[1])  # [T, 1]
    qs = mb.mul(x=mb.reshape(x=q, shape=[T, Hkv, G, D]), y=scale)
    qh = mb.reshape(x=mb.transpose(x=qs, perm=[1, 0, 2, 3]), shape=[Hkv, T * G, D])  # rows t*G + g

    # Stage 1: kernel scores [Hkv, T, NK]
    kch = mb.transpose(x=mb.squeeze(x=kc, axes=[0]), perm=[1, 0, 2])  # [Hkv, NK, D]
    logits = mb.reshape(x=mb.matmul(x=qh, y=kch, transpose_y=True), shape=[Hkv, T, G, NK])
    visible = mb.less_equal(x=_i32(st * np.arange(NK) + ks - 1)[None, :], y=pos_col)  # [T, NK]
    coarse = None
    if rule == "upstream":
        coarse = _coarse_scores(qh, kc, pos_col, p, T, G)
    score = kernel_scores(logits, visible, rule, coarse)

    # Stage 1b: block scores [Hkv, T, NB] = max over visible kernels touching the block
    J, ok = touching_kernels(NB, NK, ks, st, bs)
    R = J.shape[1]
    flat = _i32(J.reshape(-1))
    gathered = mb.reshape(x=mb.gather(x=score, indices=flat, axis=2), shape=[Hkv, T, NB, R])
    vis_g = mb.reshape(x=mb.gather(x=mb.cast(x=visible, dtype="int32"), indices=flat, axis=1), shape=[T, NB, R])
    touch = mb.logical_and(x=mb.cast(x=vis_g, dtype="bool"), y=ok)  # [T, NB, R]
    block_score = mb.reduce_max(x=mb.select(cond=mb.expand_dims(x=touch, axes=[0]), a=gathered, b=np.float32(-1.0)),
                                axes=[-1], keep_dims=False)  # [Hkv, T, NB]; scores are >= 0 where touched
    has_score = mb.greater(x=mb.reduce_max(x=mb.cast(x=touch, dtype="int32"), axes=[-1], keep_dims=False),
                           y=np.int32(0))  # [T, NB]

    # Stage 2: forced + top-k selection [Hkv, T, NB]
    blocks = _i32(np.arange(NB))[None, :]
    b_q = mb.floor_div(x=pos_col, y=np.int32(bs))  # [T, 1]
    valid = mb.less_equal(x=blocks, y=b_q)  # [T, NB]
    near = mb.greater_equal(x=blocks, y=mb.sub(x=b_q, y=np.int32(local)))
    forced = mb.logical_and(x=valid, y=mb.logical_or(x=mb.less(x=blocks, y=np.int32(init)), y=near))
    candidate = mb.logical_and(x=mb.logical_and(x=valid, y=mb.logical_not(x=forced)), y=has_score)
    n_forced = mb.reduce_sum(x=mb.cast(x=forced, dtype="int32"), axes=[-1], keep_dims=True)  # [T, 1]
    slots = mb.maximum(x=mb.sub(x=np.int32(topk + local), y=n_forced), y=np.int32(0))  # [T, 1]
    key = mb.select(cond=mb.expand_dims(x=candidate, axes=[0]), a=block_score, b=np.float32(-1.0))
    K1 = max(1, min(topk + local, NB))
    top_val, top_idx = mb.topk(x=key, k=K1, axis=-1, ascending=False)  # [Hkv, T, K1]
    rank_ok = mb.less(x=_i32(np.arange(K1))[None, None, :], y=mb.expand_dims(x=slots, axes=[0]))
    take = mb.logical_and(x=rank_ok, y=mb.greater(x=top_val, y=np.float32(-0.5)))  # [Hkv, T, K1]
    hit = mb.logical_and(x=mb.equal(x=mb.expand_dims(x=top_idx, axes=[-1]), y=_i32(np.arange(NB))),
                         y=mb.expand_dims(x=take, axes=[-1]))  # [Hkv, T, K1, NB]
    chosen = mb.greater(x=mb.reduce_max(x=mb.cast(x=hit, dtype="int32"), axes=[2], keep_dims=False),
                        y=np.int32(0))
    selected = mb.logical_or(x=mb.expand_dims(x=forced, axes=[0]), y=chosen)  # [Hkv, T, NB]
    if dense_len != -1:
        total = mb.add(x=start, y=n_valid)
        dense = mb.less(x=total, y=np.int32(dense_len))
        all_valid = mb.tile(x=mb.expand_dims(x=valid, axes=[0]), reps=[Hkv, 1, 1])
        selected = mb.select(cond=dense, a=all_valid, b=selected)

    kh = mb.transpose(x=mb.squeeze(x=k_cache, axes=[0]), perm=[1, 0, 2])  # [Hkv, S, D]
    vh = mb.transpose(x=mb.squeeze(x=v_cache, axes=[0]), perm=[1, 0, 2])
    if T == 1:
        out = _attend_gathered(qh, kh, vh, selected, pos, p, S, NB, G, D, Hkv)
    else:
        token_block = _i32(np.arange(S) // bs)
        token_sel = mb.gather(x=mb.cast(x=selected, dtype="int32"), indices=token_block, axis=2)  # [Hkv, T, S]
        causal = mb.less_equal(x=_i32(np.arange(S))[None, :], y=pos_col)  # [T, S]
        mask = mb.logical_and(x=mb.cast(x=token_sel, dtype="bool"), y=mb.expand_dims(x=causal, axes=[0]))
        mask = mb.reshape(x=mb.tile(x=mb.expand_dims(x=mask, axes=[2]), reps=[1, 1, G, 1]), shape=[Hkv, T * G, S])
        scores = mb.select(cond=mask, a=mb.matmul(x=qh, y=kh, transpose_y=True), b=np.float32(MASKED))
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=vh)  # [Hkv, T*G, D]
    out = mb.transpose(x=mb.reshape(x=out, shape=[Hkv, T, G, D]), perm=[1, 0, 2, 3])
    return mb.reshape(x=out, shape=[1, T, Hq, D], name=name)


def _coarse_scores(qh, kc, pos_col, p: dict, T: int, G: int):
    """q . Kc2 / sqrt(d) over the coarse kernels (size 4k, stride 4s), each the mean of Kc1 entries that tile it."""
    ks, st = p["kernel_size"], p["kernel_stride"]
    ks2, st2 = 4 * ks, 4 * st
    if ks % st or st2 % st:
        raise PocketllmError("InfLLM v2 upstream scoring needs kernel_size to be a multiple of kernel_stride")
    NK, Hkv = kc.shape[1], kc.shape[2]
    n2 = (st * (NK - 1) + ks - ks2) // st2 + 1  # coarse kernels inside the rows the fine ones cover
    if n2 <= 0:
        return (mb.fill(shape=_i32([Hkv, T, G, 1]), value=np.float32(0.0)),
                mb.cast(x=mb.fill(shape=_i32([T, 1]), value=0), dtype="bool"))
    parts = ks2 // ks
    index = (st2 * np.arange(n2)[:, None] + ks * np.arange(parts)[None, :]) // st  # Kc1 entries tiling Kc2[j]
    kc1 = mb.squeeze(x=kc, axes=[0])  # [NK, Hkv, D]
    tiles = mb.reshape(x=mb.gather(x=kc1, indices=_i32(index.reshape(-1)), axis=0), shape=[n2, parts, Hkv, -1])
    kc2 = mb.transpose(x=mb.reduce_mean(x=tiles, axes=[1], keep_dims=False), perm=[1, 0, 2])  # [Hkv, n2, D]
    logits = mb.reshape(x=mb.matmul(x=qh, y=kc2, transpose_y=True), shape=[Hkv, T, G, n2])
    visible = mb.less_equal(x=_i32(st2 * np.arange(n2) + ks2 - 1)[None, :], y=pos_col)
    return logits, visible


def _attend_gathered(qh, kh, vh, selected, pos, p: dict, S: int, NB: int, G: int, D: int, Hkv: int):
    """Decode: attend only to the selected blocks. Gathers Kg = enough blocks for every selection (budget, forced
    blocks, or all blocks below dense_len) per KV head; unselected gathered blocks are masked."""
    bs = p["block_size"]
    local = p["window_size"] // bs
    dense_blocks = max(0, (p["dense_len"] - 2) // bs + 1) if p["dense_len"] > 0 else 0
    Kg = min(NB, max(p["topk"] + local, p["init_blocks"] + local + 1, dense_blocks, 1))
    sel = mb.cast(x=mb.squeeze(x=selected, axes=[1]), dtype="fp32")  # [Hkv, NB]
    sel_val, sel_idx = mb.topk(x=sel, k=Kg, axis=-1, ascending=False)  # selected blocks first
    rows = mb.add(x=mb.expand_dims(x=mb.mul(x=sel_idx, y=np.int32(bs)), axes=[-1]), y=_i32(np.arange(bs)))
    rows = mb.reshape(x=rows, shape=[Hkv, Kg * bs])  # token rows of the gathered blocks
    in_cache = mb.less(x=rows, y=np.int32(S))
    rows_c = mb.minimum(x=rows, y=np.int32(S - 1))
    k_sel = mb.gather(x=kh, indices=rows_c, axis=1, batch_dims=1)  # [Hkv, Kg*bs, D]
    v_sel = mb.gather(x=vh, indices=rows_c, axis=1, batch_dims=1)
    chosen = mb.reshape(x=mb.tile(x=mb.expand_dims(x=mb.greater(x=sel_val, y=np.float32(0.5)), axes=[-1]),
                                  reps=[1, 1, bs]), shape=[Hkv, Kg * bs])
    mask = mb.logical_and(x=mb.logical_and(x=chosen, y=in_cache), y=mb.less_equal(x=rows, y=pos))  # [Hkv, Kg*bs]
    scores = mb.matmul(x=qh, y=k_sel, transpose_y=True)  # [Hkv, G, Kg*bs]
    scores = mb.select(cond=mb.expand_dims(x=mask, axes=[1]), a=scores, b=np.float32(MASKED))
    return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v_sel)  # [Hkv, G, D]


def _sparse_params(args) -> dict:
    names = ("kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len")
    return {n: int(a.val) for n, a in zip(names, args)}


def _scalar_i32(var):
    """A start position / count as an int32 scalar var."""
    if var.rank > 0:
        var = mb.squeeze(x=var)
    return var if var.dtype == types.int32 else mb.cast(x=var, dtype="int32")


@register_torch_op(torch_alias=["pocketllm_coreml::infllm_attention"], override=True)
def pocketllm_coreml_infllm_attention(context, node):
    inputs = _get_inputs(context, node, expected=14)
    q, k_cache, v_cache, kc, start, n_valid = inputs[:6]
    p = _sparse_params(inputs[6:13])
    rule = RULES[int(inputs[13].val)]
    start, n_valid = _scalar_i32(start), _scalar_i32(n_valid)
    T = q.shape[1]
    kc_new = update_compressed_keys_mil(k_cache, kc, start, T, p["kernel_size"], p["kernel_stride"])
    out = infllm_attention_mil(q, k_cache, v_cache, kc_new, start, n_valid, p, rule, name=node.name + "_out")
    context.add((out, kc_new), torch_name=node.name)


@register_torch_op(torch_alias=["pocketllm::infllm_attention"], override=True)
def pocketllm_infllm_attention(context, node):
    """The shared op (no compressed-key state): recompute every kernel from the K cache on each call."""
    inputs = _get_inputs(context, node, expected=[11, 12])
    q, k_cache, v_cache, start = inputs[:4]
    p = _sparse_params(inputs[4:11])
    rule = RULES[int(inputs[11].val) if len(inputs) > 11 else 0]
    start = _scalar_i32(start)
    S = k_cache.shape[1]
    nk = (S - p["kernel_size"]) // p["kernel_stride"] + 1
    if nk <= 0:
        raise PocketllmError(f"InfLLM v2: a cache of {S} rows holds no {p['kernel_size']}-token kernel")
    kc = mb.expand_dims(x=compressed_keys_from_rows(mb.squeeze(x=k_cache, axes=[0]), nk, p["kernel_size"],
                                                    p["kernel_stride"]), axes=[0])
    n_valid = mb.const(val=np.int32(q.shape[1]))
    context.add(infllm_attention_mil(q, k_cache, v_cache, kc, start, n_valid, p, rule, node.name),
                torch_name=node.name)


# ---------------------------------------------------------------------------------------------- lightning
def lightning_attention_mil(q, k, v, state, decay: np.ndarray, block_size: int, n_valid, name: str):
    """Block form of docs/lightning.md for q, k, v [1, T, H, D], state [1, H, D, D], per-head rates s = decay [H].

    Within a block of n rows starting at row r0 (n_b = real rows of the block, from n_valid):
        O = [(Q K^T) * Dm] V + (Q * lambda^(i+1)) S,   Dm_ij = lambda^(i-j) (i >= j)
        S' = lambda^(n_b) S + (K * w)^T V,             w_j = lambda^(n_b-1-j) for j < n_b, else 0
    so padded rows neither decay the state nor add to it. Decays are computed at run time from s (no [H, n, n]
    constant per layer). Returns (out [1, T, H, D], new state [1, H, D, D])."""
    _, T, H, D = q.shape
    s = decay.astype(np.float32).reshape(H, 1, 1)
    neg_s = mb.const(val=-s)
    qh, kh, vh = (mb.transpose(x=mb.squeeze(x=t, axes=[0]), perm=[1, 0, 2]) for t in (q, k, v))  # [H, T, D]
    S = mb.squeeze(x=state, axes=[0])  # [H, D, D]
    outs = []
    for r0 in range(0, T, block_size):
        n = min(block_size, T - r0)
        sl = lambda t: mb.slice_by_index(x=t, begin=[0, r0, 0], end=[H, r0 + n, D]) if n != T else t  # noqa: E731
        qb, kb, vb = sl(qh), sl(kh), sl(vh)
        i = np.arange(n, dtype=np.float32)
        age = (i[:, None] - i[None, :])[None]  # [1, n, n]
        intra_decay = mb.select(cond=age >= 0, a=mb.exp(x=mb.mul(x=neg_s, y=np.maximum(age, 0))), b=np.float32(0))
        intra = mb.matmul(x=mb.mul(x=mb.matmul(x=qb, y=kb, transpose_y=True), y=intra_decay), y=vb)
        q_decay = np.exp(-s * (i + 1)[None, :, None]).astype(np.float32)  # [H, n, 1]
        outs.append(mb.add(x=intra, y=mb.matmul(x=mb.mul(x=qb, y=q_decay), y=S)))
        real = mb.minimum(x=mb.maximum(x=mb.sub(x=n_valid, y=np.int32(r0)), y=np.int32(0)), y=np.int32(n))
        real_f = mb.cast(x=real, dtype="fp32")
        age_k = mb.sub(x=mb.sub(x=real_f, y=np.float32(1.0)), y=i.reshape(1, n, 1))  # [1, n, 1]: n_b - 1 - j
        w = mb.select(cond=mb.greater_equal(x=age_k, y=np.float32(0.0)),
                      a=mb.exp(x=mb.mul(x=neg_s, y=mb.maximum(x=age_k, y=np.float32(0.0)))), b=np.float32(0.0))
        S = mb.add(x=mb.mul(x=mb.exp(x=mb.mul(x=neg_s, y=real_f)), y=S),
                   y=mb.matmul(x=mb.mul(x=kb, y=w), y=vb, transpose_x=True))
    out = outs[0] if len(outs) == 1 else mb.concat(values=outs, axis=1)
    out = mb.expand_dims(x=mb.transpose(x=out, perm=[1, 0, 2]), axes=[0], name=name)
    return out, mb.expand_dims(x=S, axes=[0])


@register_torch_op(torch_alias=["pocketllm::lightning_attention"], override=True)
def pocketllm_lightning_attention(context, node):
    q, k, v, state, decay, block = _get_inputs(context, node, expected=6)
    n_valid = mb.const(val=np.int32(q.shape[1]))
    context.add(lightning_attention_mil(q, k, v, state, _np(decay), int(block.val), n_valid, node.name),
                torch_name=node.name)


# ---------------------------------------------------------------------------------------------- MoE
@register_torch_op(torch_alias=["pocketllm_coreml::moe_routed_experts"], override=True)
def pocketllm_coreml_moe_routed_experts(context, node):
    """u [M, H] (M = 1 in decode), ids [M, k], weights [M, k]. out = sum over experts e of w_e * expert_e(u), where
    expert e runs inside `cond(e is routed)`: the other experts' weights are never read."""
    u, ids, weights, tensors, layout = _get_inputs(context, node, expected=5)
    layout = layout if isinstance(layout, str) else str(layout.val)
    activation, experts = split_expert_tensors(layout, [_np(t) for t in tensors])
    ids = _scalar_free_i32(ids)
    dtype = BLOCK_DTYPE[0]
    u_in = mb.cast(x=u, dtype=dtype) if dtype == "fp16" else u
    out = None
    for e, linears in enumerate(experts):
        prefix = f"{node.name}_e{e}"
        # weights outside the branch (constexpr / const ops at function level, shared by both functions); the
        # branch only computes, in the package's precision
        wv = [quantized_weight_vars(sch, g, ts, f"{prefix}_{part}", dtype)
              for (sch, g, ts), part in zip(linears, ("gate", "up", "down"))]
        hit = mb.equal(x=ids, y=np.int32(e))  # [M, k]
        w_e = mb.reduce_sum(x=mb.select(cond=hit, a=weights, b=np.float32(0.0)), axes=[-1], keep_dims=True)
        w_e = mb.cast(x=w_e, dtype=dtype) if dtype == "fp16" else w_e
        pred = mb.greater(x=mb.reduce_sum(x=mb.cast(x=hit, dtype="int32"), axes=[0, 1], keep_dims=False),
                          y=np.int32(0))

        def run(linears=linears, wv=wv, w_e=w_e, prefix=prefix):
            (gs, gg, _), (us, ug, _), (ds, dg, _) = linears
            g = quantized_matmul_mil(u_in, gs, gg, wv[0], f"{prefix}_gate", dtype)
            a = mb.relu(x=g) if activation == "reglu" else mb.silu(x=g)
            h = mb.mul(x=a, y=quantized_matmul_mil(u_in, us, ug, wv[1], f"{prefix}_up", dtype))
            return mb.mul(x=quantized_matmul_mil(h, ds, dg, wv[2], f"{prefix}_down", dtype), y=w_e)

        zero = np.float16(0.0) if dtype == "fp16" else np.float32(0.0)
        y = mb.cond(pred=pred, _true_fn=run, _false_fn=lambda: mb.mul(x=u_in, y=zero))
        out = y if out is None else mb.add(x=out, y=y)
    context.add(mb.cast(x=out, dtype="fp32") if dtype == "fp16" else out, torch_name=node.name)


# Precision of the routed experts' blocks: the package's compute precision (lower.convert_function sets it)
BLOCK_DTYPE = ["fp16"]


def _scalar_free_i32(var):
    return var if var.dtype == types.int32 else mb.cast(x=var, dtype="int32")
