"""Custom ops, one file each: torch.library schema (functional + `.out`), reference impl, fake impl.

Importing this package registers every op once per process (Python's import cache is the guard).
"""

from pocketllm.export.ops import infllm_attention  # noqa: F401  (registers pocketllm::infllm_attention)
from pocketllm.export.ops import lightning_attention  # noqa: F401  (registers pocketllm::lightning_attention)
from pocketllm.export.ops import any4_linear  # noqa: F401  (registers pocketllm::any4_linear)
