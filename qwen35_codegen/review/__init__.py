"""What a reviewer reads: key manifests, parameter counts, summaries and spec/key diffs."""
