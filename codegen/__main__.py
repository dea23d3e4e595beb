"""`python -m codegen` is the `codegen` command."""

import sys

from codegen.cli import main

sys.exit(main())
