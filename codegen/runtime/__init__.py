"""The small runtime that generated bridges import: transforms, checkpoint I/O, Megatron models.

It knows nothing about templates or the generator; generated modules depend on it, not the reverse.
"""
