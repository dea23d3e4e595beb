"""A bridge's mapping table: the mapping kinds a generated table is made of (`kinds`), the pure
tensor transforms they name (`transforms`) with the dimensions that parametrise them (`dims`), how
each Megatron tensor is cut across tensor-parallel ranks (`splits`), the expanded table
(`table`), and how Megatron parameter names carry layer and expert numbers (`names`)."""
