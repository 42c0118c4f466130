"""The one exception type users see, defined here so that the reference's model math imports nothing from export/
(export/errors.py re-exports it). The CLI prints its message on one line and exits with code 2."""


class PocketllmError(Exception):
    """A user-facing error: the message names the file, key or tensor and what was expected."""
