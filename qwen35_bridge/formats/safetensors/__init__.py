"""safetensors files (https://github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header length, a JSON header with each tensor's dtype, shape and byte offsets, then
the data. `header` reads headers without torch; `reader` maps tensors; `writer` streams shards."""
