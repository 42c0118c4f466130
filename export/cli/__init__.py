"""The `pocketllm` command line: thin typer commands over plain functions, one file per command group."""
