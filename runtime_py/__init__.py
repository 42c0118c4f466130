"""pocketllm's numpy reference runtime: the oracle that exported artifacts are checked against.

Model math in numpy only, written from shared/docs/MODELS.md and docs/infllm_v2.md; it shares nothing with
export/ but the spec reader (export.spec) and the checkpoint validator (export.checkpoint).
"""

from pocketllm.runtime_py.generate import GenerationResult, generate
from pocketllm.runtime_py.model import ReferenceModel

__all__ = ["GenerationResult", "ReferenceModel", "generate"]
