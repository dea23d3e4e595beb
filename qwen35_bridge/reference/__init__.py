"""HF reference forwards that `verify` (and the tests) hold a conversion against: transformers'
models from raw configs, the MTP layer transformers lacks, VL prompts, and expert layouts."""
