"""The one exception type users see (defined in runtime_py/errors.py, which the numpy reference's model math can
import without importing export/). The CLI prints its message on one line and exits with code 2."""

from pocketllm.runtime_py.errors import PocketllmError

__all__ = ["PocketllmError"]
