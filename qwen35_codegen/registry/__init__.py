"""The committed bridges (index, drift check inputs) and finding the bridge for a checkpoint."""
