"""Shared by the trainer tests: the runlocal demo config, a shared synthetic-data cache, CLI runs."""
import os
import subprocess
import sys

import ml_collections

from grain_jax.configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Identical in every trainer test (in-process and subprocess) so the train step compiles once
# per session (persistent compilation cache): the schedule's constants are part of the program.
TOTAL_STEPS = 12


def runlocal_config(data_cache_dir: str, **overrides) -> ml_collections.ConfigDict:
    config = demo.get_config("runlocal")
    config.data_cache_dir = data_cache_dir
    config.total_steps = TOTAL_STEPS
    config.evals = {}
    config.update(overrides)
    return config


def cli(workdir: str, data_cache_dir: str, *flags: str, config_args: str = "runlocal") -> list[str]:
    """The ``grain-jax-train`` command line for the same config as ``runlocal_config``."""
    return [sys.executable, "-m", "grain_jax.cli.train", f"--config={REPO}/grain_jax/configs/demo.py:{config_args}",
            f"--workdir={workdir}", f"--config.data_cache_dir={data_cache_dir}",
            f"--config.total_steps={TOTAL_STEPS}", *flags]


def subprocess_env(**extra) -> dict:
    """8 fake CPU devices and the tests' compilation cache, like conftest.py gives in-process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=os.environ["GRAIN_JAX_TEST_CACHE"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(command: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
