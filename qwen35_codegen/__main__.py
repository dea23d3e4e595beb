"""`python -m codegen` is the `codegen` command."""

import sys

from qwen35_codegen.cli.main import main

sys.exit(main())
