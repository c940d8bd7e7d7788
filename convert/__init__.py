"""Command-line converters between the official safetensors layout and orbax checkpoints.

    python -m convert.to_orbax SRC OUT [--dtype auto|bfloat16|float32|float16]
    python -m convert.to_safetensors ORBAX_DIR OUT [--max-shard-size 5GB]

Both stream tensor by tensor (bounded host memory), write into a temporary sibling folder and
rename it at the end, and print a summary of what was written.
"""
