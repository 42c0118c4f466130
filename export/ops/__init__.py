"""Custom ops, one file each: torch.library schema (functional + `.out`), reference impl, fake impl.

Importing this package registers every op once per process (Python's import cache is the guard).
"""

from export.ops import infllm_attention  # noqa: F401  (registers pocketllm::infllm_attention)
from export.ops import lightning_attention  # noqa: F401  (registers pocketllm::lightning_attention)
from export.ops import any4_linear  # noqa: F401  (registers pocketllm::any4_linear)
from export.ops import moe_ffn  # noqa: F401  (registers pocketllm::moe_ffn, pocketllm::moe_ffn_any4)
