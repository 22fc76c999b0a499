"""Multi-host start: decide whether and how to call ``jax.distributed.initialize()``.

``initialize()`` runs before anything touches a JAX backend (the training binary calls it first)
and logs one line saying what it found. In order:

1. ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``): an explicit launch.
2. SLURM (an ``srun`` step with more than one task): JAX's SLURM detection gives the coordinator
   and process ids; the GPUs a task uses are decided here, because JAX's own rule
   (``local_device_ids=[SLURM_LOCALID]``) is right only when every task of a node sees all the
   node's GPUs and uses one: it asks for a GPU the task cannot see under ``--gpus-per-task=1``
   (SLURM then makes one GPU visible per task) and leaves all but one GPU idle with one task per node.
3. Cloud TPU VMs (GCE TPU VMs, multi-slice with ``MEGASCALE_*``, GKE): JAX's TPU cluster
   detection, which reads the worker list from the metadata server (GCE) or ``TPU_WORKER_HOSTNAMES``
   (GKE); a ``gcloud ... ssh --worker=all`` shell holds none of these in its environment. Every
   TPU VM initialises, single host included (as big_vision does): the preemption service needs it.
4. Otherwise: one process.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any


_TPU_CLUSTERS = ("GkeTpuCluster", "GceTpuCluster")  # JAX's TPU cluster classes, GKE's env vars first


@dataclasses.dataclass(frozen=True)
class Launch:
    """What ``detect`` found: ``kwargs`` for ``jax.distributed.initialize`` (None = single process)."""
    method: str
    description: str
    kwargs: dict[str, Any] | None


def _slurm_tasks_on_node(environ) -> int:
    """Tasks of this step on this node, from ``SLURM_STEP_TASKS_PER_NODE``-style lists ("8(x2),4")."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            counts = []
            for part in environ[name].split(","):
                match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
                if match is None:
                    raise ValueError(f"{name}={environ[name]!r} is not a SLURM tasks-per-node list")
                counts += [int(match.group(1))] * int(match.group(2) or 1)
            return counts[int(environ.get("SLURM_NODEID", 0))]
    return int(environ.get("SLURM_NTASKS_PER_NODE", 1))


def _visible_gpus(environ) -> int | None:
    """GPUs this task can see: ``CUDA_VISIBLE_DEVICES`` (set by SLURM's GPU binding) or the node's count."""
    if environ.get("CUDA_VISIBLE_DEVICES"):
        return len(environ["CUDA_VISIBLE_DEVICES"].split(","))
    if environ.get("SLURM_GPUS_ON_NODE"):
        return int(environ["SLURM_GPUS_ON_NODE"])
    return None


def slurm_local_device_ids(environ=None) -> list[int]:
    """The local device ids this SLURM task should use ([] = every device it can see).

    - one task per node, or each task bound to its own GPUs (``--gpus-per-task``, fewer visible
      GPUs than tasks on the node): all visible devices;
    - tasks sharing the node's G visible GPUs: the block of G / tasks GPUs at ``SLURM_LOCALID``;
    - GPU count unknown: JAX's rule, one GPU per task.
    """
    environ = os.environ if environ is None else environ
    tasks, local_id = _slurm_tasks_on_node(environ), int(environ["SLURM_LOCALID"])
    gpus = _visible_gpus(environ)
    if tasks == 1 or (gpus is not None and gpus < tasks):
        return []
    if gpus is None:
        return [local_id]
    if gpus % tasks:
        raise ValueError(f"{gpus} visible GPUs cannot be split evenly over the {tasks} SLURM tasks of this node; "
                         f"use --gpus-per-task or --ntasks-per-node that divides the GPUs")
    per_task = gpus // tasks
    return list(range(local_id * per_task, (local_id + 1) * per_task))


def _tpu_cluster():
    """JAX's TPU cluster class that is present here (GCE metadata / GKE env), or None."""
    from jax._src.clusters import cloud_tpu_cluster
    for name in _TPU_CLUSTERS:
        cluster = getattr(cloud_tpu_cluster, name)
        if cluster.is_env_present():
            return cluster
    return None


def detect() -> Launch:
    """Reads the environment (and, on Cloud TPU VMs, the metadata server); initialises nothing."""
    environ = os.environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(name)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not: set all three on "
                             f"every process (or unset JAX_COORDINATOR_ADDRESS under SLURM / on TPU VMs)")
        count, index = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        return Launch("env", f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}: process {index} of {count}",
                      dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"], num_processes=count,
                           process_id=index))
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        devices = slurm_local_device_ids(environ)
        count, index = int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
        return Launch("slurm", f"SLURM job {environ['SLURM_JOB_ID']}: task {index} of {count} (local id "
                               f"{environ['SLURM_LOCALID']}, {_slurm_tasks_on_node(environ)} on this node), local "
                               f"devices {devices or 'all visible'}",
                      # [] (not None) so that JAX's SLURM detection keeps its hands off the devices.
                      dict(cluster_detection_method="slurm", local_device_ids=devices))
    cluster = _tpu_cluster()
    if cluster is not None:
        count, index = cluster.get_process_count(), cluster.get_process_id()
        slices = cluster._get_num_slices()  # pylint: disable=protected-access
        address = cluster.get_coordinator_address(timeout_secs=300,
                                                  override_coordinator_port=environ.get("JAX_COORDINATOR_PORT"))
        where = (f", slice {cluster._get_slice_id()} of {slices} (MEGASCALE)"  # pylint: disable=protected-access
                 if slices > 1 else "")
        return Launch(cluster.name, f"Cloud TPU VM ({cluster.name}): process {index} of {count}{where}"
                                    f", coordinator {address}",
                      dict(coordinator_address=address, num_processes=count, process_id=index))
    return Launch("none", "no multi-process launch detected (no JAX_COORDINATOR_ADDRESS, no multi-task SLURM step, "
                          "not a Cloud TPU VM): one process", None)


def initialize() -> Launch:
    """``detect()``, then ``jax.distributed.initialize`` when it found a multi-process launch.

    Returns what was detected; the caller logs ``launch.description`` once its console is set up.
    """
    import jax
    launch = detect()
    if launch.kwargs is not None:
        jax.distributed.initialize(**launch.kwargs)
    return launch
