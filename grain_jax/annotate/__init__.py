"""grain-jax-annotate: GRAIN training data from image-text pairs (MLLM descriptions + OWLv2 boxes)."""
