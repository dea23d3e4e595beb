"""The megatron-core harness: building the GPTModel or HybridModel (and VL) model from a bridge,
parallel state, CPU shims and backend, and live load/export of a built model's parameters."""
