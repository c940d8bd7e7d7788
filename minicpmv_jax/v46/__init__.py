"""MiniCPM-V 4.6: SigLIP2 tower with the intra-ViT window merger, the 2x2 projector and the
Qwen3.5 hybrid (Gated DeltaNet + gated full attention) text model.

Modules: config.py (frozen dataclasses from config.json), siglip2.py (vision tower + ViT merger),
projector.py (2x2 merger MLP), deltanet.py (Gated DeltaNet: conv, chunked and recurrent delta
rule), qwen35.py (text model and its hybrid cache), model.py (the whole network, loading, prompt
logits and generation), processor.py (numpy/PIL processor).
"""
