"""Test setup: 8 fake CPU devices, a persistent compilation cache, parsed absl flags."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU AOT tests (libtpu installed) describe a topology and use no chip: do not fail because another jax
# process on the machine holds libtpu's lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_CACHE = os.environ.setdefault(
    "GRAIN_JAX_TEST_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))

import jax  # noqa: E402  (must come after XLA_FLAGS)
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
flags.FLAGS.mark_as_parsed()  # grain reads absl flags
