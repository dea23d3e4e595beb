"""Checkpoint formats: HF and Megatron safetensors (`safetensors`), megatron-core torch_dist
(`torch_dist`), FP8 block quantisation (`fp8`), the record a Megatron output keeps (`record`), and
destinations that appear only once complete (`staging`). Readers share one protocol (`protocol`)."""
