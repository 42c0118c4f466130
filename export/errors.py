"""The one exception type users see. The CLI prints its message on one line and exits with code 2."""


class PocketllmError(Exception):
    """A user-facing error: the message names the file, key or tensor and what was expected."""
