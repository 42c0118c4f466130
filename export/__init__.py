"""pocketllm export side: checkpoint reading, the torch model, custom ops, quantization and phone targets."""


def version() -> str:
    """pocketllm's version, from the installed package's metadata (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("pocketllm")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
