"""grain_jax: GRAIN (Grounding Descriptions in Images) in JAX/Flax."""


def create_model(name: str, **overrides):
    """A registered model by name, e.g. ``create_model("grain-vit-b16")``."""
    from grain_jax.models import create_model as _create
    return _create(name, **overrides)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    from grain_jax.models import list_models as _list
    return _list()
