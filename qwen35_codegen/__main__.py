"""`python -m codegen` is the `codegen` command."""

from qwen35_codegen.cli.main import run

run()
