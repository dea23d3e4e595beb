"""The Qwen3.5 vision-language model in megatron-core: the vision tower, its patch grid, the
language model's mRoPE positions, and the two joined (`multimodal`)."""
