"""The `codegen` command line: its verbs, and the conversion and verification they run."""
