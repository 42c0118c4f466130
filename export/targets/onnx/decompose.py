"""Standard-op decompositions of pocketllm's attention ops, written in torch for `torch.onnx.export` (every torch op
used here maps onto plain ai.onnx ops: MatMul, CumSum, Round, Pow, TopK, ScatterElements, Where, Softmax, If).

InfLLM v2 (docs/infllm_v2.md) follows runtime_py/ops/infllm_attention.py step by step, with its fixed float64
arithmetic (step 3a), so that onnxruntime selects exactly the reference's blocks, ties included:
- every ordered sum (a window of keys, a dot product over head_dim, exp over the normalising keys) is the last
  element of a CumSum along that axis: onnxruntime's CumSum adds slice after slice in index order, which is the
  reference's `total = total + x[i]` loop (a ReduceSum or a float64 MatMul may add in another order);
- exp is `exp_fixed`: Round (ties to even, as np.rint), the Taylor polynomial by separate Mul and Add nodes (no
  fused multiply-add on the CPU provider), times 2^k as Pow(2, k) (exact for the integer k in [-866, 1010]);
- TopK keeps the lower index first among equal values, as the reference's stable sort.
Memory: a dot product over head_dim holds [Hq, T, n_kernels, head_dim] float64 products before the CumSum; that is
small in decode (T = 1) and grows with a prefill chunk (T x L / 16 x head_dim x 8 bytes per query head).

Lightning (docs/lightning.md): every call is one block in float64 (the reference's block size only changes rounding).
"""

from __future__ import annotations

import math

import torch

from pocketllm.export.ops.infllm_attention import EXP_INF_ABOVE, EXP_TAYLOR, EXP_ZERO_BELOW, LN2_HI, LN2_LO, LOG2E
from pocketllm.export.spec import SparseSpec

RULES = ("upstream", "exact")


# ------------------------------------------------------------------------------------------ softmax attention
def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention, fp32, scale 1/sqrt(D), grouped-query without repeating K/V.

    q: [1, T, Hq, D]; keys, values: [1, L, Hkv, D] (every row valid); mask: bool [T, L] (all heads) or [Hkv, T, L]
    (per KV head). Returns [1, T, Hq, D]. Every query row must see at least one key.
    """
    _, T, Hq, D = q.shape
    Hkv = keys.shape[2]
    G = Hq // Hkv
    k = keys[0].float().permute(1, 0, 2)  # [Hkv, L, D]
    v = values[0].float().permute(1, 0, 2)
    qg = q[0].float().reshape(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)
    scores = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [Hkv, G*T, L]
    scores = scores.reshape(Hkv, G, T, -1)
    m = mask[None, None] if mask.dim() == 2 else mask[:, None]  # [1|Hkv, 1, T, L]
    scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1).reshape(Hkv, G * T, -1)
    out = (probs @ v).reshape(Hkv, G, T, D)
    return out.permute(2, 0, 1, 3).reshape(1, T, Hq, D)


def causal_mask(positions: torch.Tensor, L, window: int | None = None) -> torch.Tensor:
    """bool [T, L]: the query at absolute position i sees key j iff j <= i (and i - j < window)."""
    j = torch.arange(L)
    visible = j[None, :] <= positions[:, None]
    if window is not None:
        visible = visible & (positions[:, None] - j[None, :] < window)
    return visible


# ------------------------------------------------------------------------------------------ InfLLM v2
def ordered_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum along `dim` in index order (x[0] + x[1] + ... left to right): the last element of CumSum."""
    return torch.cumsum(x, dim=dim).select(dim, -1)


# float64 constants of the selection, passed in as one float64 tensor (`constants_table`): a Python float becomes a
# float32 ONNX constant cast to double (rounding LOG2E, ln 2's split, 1/n!, 1/sqrt(D)), and a tensor created inside
# the dense/sparse torch.cond branches breaks the ONNX exporter ("FunctionalTensor on its own").
CONSTANT_NAMES = ("log2e", "ln2_hi", "ln2_lo", "zero_below", "inf_above", "two", "inf", "zero", "scale",
                  *(f"taylor{n}" for n in range(12)))
_C = {name: i for i, name in enumerate(CONSTANT_NAMES)}


def constants_table(head_dim: int) -> torch.Tensor:
    """float64 [len(CONSTANT_NAMES)]: exp_fixed's constants and the logits' 1/sqrt(head_dim)."""
    values = {"log2e": LOG2E, "ln2_hi": LN2_HI, "ln2_lo": LN2_LO, "zero_below": EXP_ZERO_BELOW,
              "inf_above": EXP_INF_ABOVE, "two": 2.0, "inf": math.inf, "zero": 0.0, "scale": 1.0 / math.sqrt(head_dim),
              **{f"taylor{n}": EXP_TAYLOR[n] for n in range(12)}}
    return torch.tensor([values[name] for name in CONSTANT_NAMES], dtype=torch.float64)


def exp_fixed(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64 exp from IEEE +, -, * in the reference's order (export/ops/infllm_attention.exp_fixed), with 2^k as
    a power of two instead of built from bits (ONNX has no bit cast). table: constants_table()."""
    def c(name: str) -> torch.Tensor:
        return table[_C[name]]

    xc = torch.minimum(torch.maximum(x, c("zero_below")), c("inf_above"))
    k = torch.round(xc * c("log2e"))
    r = (xc - k * c("ln2_hi")) - k * c("ln2_lo")
    p = torch.zeros_like(r) + c("taylor11")
    for n in range(10, -1, -1):
        p = p * r + c(f"taylor{n}")
    y = p * torch.pow(c("two"), k)
    y = torch.where(x > c("inf_above"), c("inf"), y)
    return torch.where(x < c("zero_below"), c("zero"), y)


def compressed_keys(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k: [L, Hkv, D] fp32 -> [L // stride + 1, Hkv, D] fp32: the mean of the `size` keys from each multiple of
    `stride`, summed in float64 in window order and rounded once (the reference's compressed_keys).

    The keys are padded with `size` zero rows so that the count is never 0 (ONNX and empty tensors): windows past
    the last complete one include padding, and no query can see them (kernel_visibility), so they never count."""
    L, Hkv, D = k.shape
    n = L // stride + 1
    padded = torch.cat([k.double(), k.new_zeros((size, Hkv, D), dtype=torch.float64)], dim=0)
    idx = stride * torch.arange(n)[:, None] + torch.arange(size)[None, :]  # [n, size]
    return (ordered_sum(padded[idx], 1) / size).float()


def kernel_visibility(n, positions: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """bool [T, n]: the query at position i sees compressed key j iff its window ends at or before i."""
    return (stride * torch.arange(n) + size - 1)[None, :] <= positions[:, None]


def kernel_logits(q: torch.Tensor, kc: torch.Tensor, visible: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], kc [n, Hkv, D] -> q_h . kc[j] * (1 / sqrt(D)) float64 [Hkv, G, T, n], summed over D in order
    (products of fp32 values are exact in float64); -inf where not visible."""
    T, Hq, D = q.shape
    Hkv = kc.shape[1]
    qg = q.double().reshape(T, Hkv, Hq // Hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    kd = kc.double().permute(1, 0, 2)[:, None, None]  # [Hkv, 1, 1, n, D]
    dot = ordered_sum(qg[:, :, :, None, :] * kd, -1)  # [Hkv, G, T, n]
    return (dot * table[_C["scale"]]).masked_fill(~visible, -math.inf)


def group_scores(x: torch.Tensor, x_norm: torch.Tensor, visible: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Step 3: sum over the group's heads of exp(x - LSE(x_norm)) = exp(x - m) * (1 / l), m = max x_norm,
    l = sum exp(x_norm - m) in key order; +inf when no normalising key is visible; -inf where x is not visible.
    x [Hkv, G, T, n], x_norm [Hkv, G, T, n_norm] -> [Hkv, T, n]."""
    m = x_norm.amax(dim=-1)  # [Hkv, G, T]
    seen = m > -math.inf
    m = torch.where(seen, m, torch.zeros_like(m))[..., None]
    total = ordered_sum(exp_fixed(x_norm - m, table), -1)
    p = exp_fixed(x - m, table) * (1.0 / torch.where(seen, total, torch.ones_like(total)))[..., None]
    p = torch.where(seen[..., None], p, torch.full_like(p, math.inf))
    group = p[:, 0]
    for g in range(1, p.shape[1]):  # in head order (G is static)
        group = group + p[:, g]
    return group.masked_fill(~visible[None], -math.inf)


def kernel_scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, sparse: SparseSpec,
                  table: torch.Tensor) -> torch.Tensor:
    """Steps 2-3. q: [T, Hq, D], k: [L, Hkv, D] (valid keys), positions [T] -> group scores [Hkv, T, n] float64,
    -inf for kernels the query cannot see. The rule is sparse.score_rule ("upstream" or "exact")."""
    size, stride = sparse.kernel_size, sparse.kernel_stride
    kc = compressed_keys(k, size, stride)
    visible = kernel_visibility(kc.shape[0], positions, size, stride)
    x = kernel_logits(q, kc, visible, table)
    if sparse.score_rule == "exact":
        return group_scores(x, x, visible, table)
    if sparse.score_rule != "upstream":
        raise ValueError(f"unknown InfLLM v2 score rule {sparse.score_rule!r} (expected one of {RULES})")
    size2, stride2 = sparse.coarse_kernel_size, sparse.coarse_kernel_stride
    kc2 = compressed_keys(k, size2, stride2)
    x2 = kernel_logits(q, kc2, kernel_visibility(kc2.shape[0], positions, size2, stride2), table)
    return group_scores(x, x2, visible, table)


def block_scores(group: torch.Tensor, n_blocks, sparse: SparseSpec) -> torch.Tensor:
    """Step 4. group [Hkv, T, n] -> [Hkv, T, n_blocks]: max over the kernels touching each block (kernel j covers
    tokens [stride*j, stride*j + size), block b covers [B*b, B*b + B)); -inf where none is visible."""
    size, stride, B = sparse.kernel_size, sparse.kernel_stride, sparse.block_size
    n = group.shape[-1]
    b = torch.arange(n_blocks)
    lo = -torch.div(size - 1 - B * b, stride, rounding_mode="floor")  # ceil((B*b - size + 1) / stride)
    hi = torch.div(B * b + B - 1, stride, rounding_mode="floor") + 1
    span = max(((B * c + B - 1) // stride + 1) - (-((size - 1 - B * c) // stride)) for c in range(stride))
    j = lo[:, None] + torch.arange(span)[None, :]  # [n_blocks, span]
    ok = (j >= 0) & (j < hi[:, None]) & (j < n)
    picked = group[:, :, j.clamp(min=0).clamp(max=n - 1)]  # [Hkv, T, n_blocks, span]
    return picked.masked_fill(~ok, -math.inf).amax(dim=-1)


def select_blocks(scores: torch.Tensor, positions: torch.Tensor, sparse: SparseSpec) -> torch.Tensor:
    """Steps 5-6. scores [Hkv, T, nb] -> bool [Hkv, T, nb]: forced blocks (init + local window) plus the best
    `budget - #forced` other valid blocks scoring above -inf, ties to the lower index."""
    nb = scores.shape[-1]
    b = torch.arange(nb)[None, :]
    b_q = torch.div(positions, sparse.block_size, rounding_mode="floor")[:, None]  # [T, 1]
    valid = b <= b_q
    forced = valid & ((b < sparse.init_blocks) | (b >= b_q - sparse.local_blocks))  # [T, nb]
    slots = torch.clamp(sparse.budget - forced.sum(dim=-1), min=0)  # [T]
    candidate = valid[None] & ~forced[None] & (scores > -math.inf)
    ranked = scores.masked_fill(~candidate, -math.inf)
    order = torch.topk(ranked, nb, dim=-1, largest=True, sorted=True).indices  # equal values: lower index first
    rank = torch.zeros_like(order).scatter(-1, order, torch.arange(nb).expand_as(order))
    return forced[None] | (candidate & (rank < slots[None, :, None]))


def sparse_token_mask(q, keys, positions, causal, sparse: SparseSpec, table: torch.Tensor) -> torch.Tensor:
    """bool [Hkv, T, L]: the tokens of the blocks InfLLM v2 selects (q [1, T, Hq, D], keys [1, L, Hkv, D])."""
    L, B = keys.shape[1], sparse.block_size
    group = kernel_scores(q[0], keys[0], positions, sparse, table)
    selected = select_blocks(block_scores(group, (L + B - 1) // B, sparse), positions, sparse)  # [Hkv, T, nb]
    return selected[:, :, torch.div(torch.arange(L), B, rounding_mode="floor")] & causal[None]


def infllm_attention(q, keys, values, positions, key_mask, sparse: SparseSpec, table: torch.Tensor) -> torch.Tensor:
    """InfLLM v2 over the present cache. q [1, T, Hq, D] at `positions`; keys, values [1, L, Hkv, D]; key_mask
    bool [L] (genai's attention_mask); table: constants_table(D) (a buffer of the calling module). Returns
    [1, T, Hq, D].

    Below dense_len total tokens the call is dense; the choice is an ONNX If (torch.cond), so a dense call runs none
    of the selection's nodes."""
    L = keys.shape[1]
    causal = causal_mask(positions, L) & key_mask[None, :]  # [T, L]

    def sparse_branch(q, keys, values, positions, causal, table):
        return masked_attention(q, keys, values, sparse_token_mask(q, keys, positions, causal, sparse, table))

    if sparse.dense_len == -1:
        return sparse_branch(q, keys, values, positions, causal, table)

    def dense_branch(q, keys, values, positions, causal, table):
        return masked_attention(q, keys, values, causal)

    return torch.cond(L < sparse.dense_len, dense_branch, sparse_branch, (q, keys, values, positions, causal, table))


# ------------------------------------------------------------------------------------------ lightning
def lightning_attention(q, k, v, state, decay):
    """pocketllm::lightning_attention with all T tokens of a call as one block, in float64 (docs/lightning.md).

    q, k, v: [1, T, H, D]; state: [1, H, D, D] fp32; decay: [H] fp32 rates. Returns (out [1, T, H, D] in q's
    dtype, new state [1, H, D, D] fp32). Decays are exp(-rate * age) with age >= 0: long calls underflow towards 0
    (the true limit) and never overflow."""
    T = q.shape[1]
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k, v))  # [1, H, T, D]
    s = decay.double().view(1, -1, 1, 1)
    i = torch.arange(T, dtype=torch.float64)
    age = i[:, None] - i[None, :]
    within = torch.exp(-s * age.clamp(min=0)).masked_fill(age < 0, 0.0)  # [1, H, T, T]
    S = state.double()
    out = ((qf @ kf.transpose(-1, -2)) * within) @ vf + (qf * torch.exp(-s * (i + 1)[:, None])) @ S
    k_decay = torch.exp(-s * (T - 1 - i)[:, None])  # [1, H, T, 1]
    new_state = torch.exp(-s * T) * S + (kf * k_decay).transpose(-1, -2) @ vf
    return out.transpose(1, 2).to(q.dtype), new_state.float()
