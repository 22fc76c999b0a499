"""PyTorch checkpoint importers: the authors' GRAIN checkpoints and OpenAI / open_clip CLIP weights.

Console script: ``grain-jax-convert {reference,open_clip} --input FILE --output DIR``.
Needs the optional ``convert`` extra (PyTorch CPU build, safetensors).
"""
