"""Multi-host start detection over simulated launch environments, and the launch scripts' commands."""
import http.server
import os
import shlex
import stat
import subprocess
import threading

import pytest
from jax._src.clusters import cloud_tpu_cluster

from grain_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH_PREFIXES = ("JAX_", "SLURM_", "TPU_", "MEGASCALE_", "CUDA_VISIBLE_DEVICES", "GCE_METADATA_IP")


@pytest.fixture
def environ(monkeypatch):
    """A launch-free environment (JAX sets TPU_SKIP_MDS_QUERY on import on machines without TPUs)."""
    for name in list(os.environ):
        if name.startswith(_LAUNCH_PREFIXES) and name != "JAX_PLATFORMS":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def tpu_vm(environ):
    """This process on a Cloud TPU VM whose GCE metadata server (a local HTTP server) serves ``attributes``."""
    attributes = {"tpu-env": ""}  # e.g. "MEGASCALE_NUM_SLICES: '2'" lines on multi-slice VMs

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            key = self.path.rsplit("/", 1)[-1]
            ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
            body = attributes.get(key, "").encode() if ok else b"not found"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    environ.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    environ.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)  # what jax sets on import on a TPU VM
    yield attributes
    server.shutdown()


def test_plain_machine_is_one_process(environ):
    launch = distributed.detect()
    assert launch.kwargs is None and launch.method == "none"


def test_explicit_jax_environment(environ):
    environ.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    environ.setenv("JAX_NUM_PROCESSES", "4")
    environ.setenv("JAX_PROCESS_ID", "3")
    launch = distributed.detect()
    assert launch.kwargs == dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)
    environ.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not"):
        distributed.detect()


def test_gce_tpu_vm_pod_reads_the_metadata_server(tpu_vm):
    tpu_vm.update({"agent-worker-number": "2", "worker-network-endpoints": "127.0.0.1,10.0.0.3,10.0.0.4,10.0.0.5"})
    launch = distributed.detect()
    assert launch.method == "gcetpu"
    assert launch.kwargs == dict(coordinator_address="127.0.0.1:8482", num_processes=4, process_id=2)
    assert launch.description == "Cloud TPU VM (gcetpu): process 2 of 4, coordinator 127.0.0.1:8482"


def test_single_host_tpu_vm_still_initialises(tpu_vm):
    tpu_vm.update({"agent-worker-number": "0", "worker-network-endpoints": "127.0.0.1"})
    assert distributed.detect().kwargs == dict(coordinator_address="127.0.0.1:8482", num_processes=1, process_id=0)


def test_multislice_tpu(tpu_vm, environ):
    tpu_vm.update({"agent-worker-number": "1", "worker-network-endpoints": "w0:0:10.0.0.2,w1:1:10.0.0.3"})
    environ.setenv("MEGASCALE_COORDINATOR_ADDRESS", "127.0.0.1")
    environ.setenv("MEGASCALE_NUM_SLICES", "2")
    environ.setenv("MEGASCALE_SLICE_ID", "1")
    launch = distributed.detect()
    assert launch.kwargs == dict(coordinator_address="127.0.0.1:8482", num_processes=4, process_id=3)
    assert "slice 1 of 2 (MEGASCALE)" in launch.description


def test_gke_tpu_uses_worker_hostnames(tpu_vm, environ):
    environ.setenv("TPU_WORKER_HOSTNAMES", "127.0.0.1,host-1")
    environ.setenv("TPU_WORKER_ID", "1")
    launch = distributed.detect()
    assert launch.method == "gketpu"
    assert launch.kwargs == dict(coordinator_address="127.0.0.1:8482", num_processes=2, process_id=1)


def _slurm(environ, *, ntasks, tasks_per_node, localid, cuda_visible=None):
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-002]", SLURM_NTASKS=str(ntasks),
                            SLURM_PROCID=str(localid), SLURM_LOCALID=str(localid), SLURM_NODEID="0",
                            SLURM_STEP_TASKS_PER_NODE=tasks_per_node).items():
        environ.setenv(name, value)
    if cuda_visible is not None:
        environ.setenv("CUDA_VISIBLE_DEVICES", cuda_visible)
    return distributed.detect()


def test_slurm_one_task_per_gpu_with_all_node_gpus_visible(environ):
    launch = _slurm(environ, ntasks=16, tasks_per_node="8(x2)", localid=5, cuda_visible="0,1,2,3,4,5,6,7")
    assert launch.kwargs == dict(cluster_detection_method="slurm", local_device_ids=[5])


def test_slurm_gpus_per_task_binding_uses_the_visible_gpu(environ):
    # --gpus-per-task=1: SLURM makes only this task's GPU visible; JAX's rule would ask for device 5.
    launch = _slurm(environ, ntasks=16, tasks_per_node="8(x2)", localid=5, cuda_visible="5")
    assert launch.kwargs == dict(cluster_detection_method="slurm", local_device_ids=[])
    assert "local devices all visible" in launch.description


def test_slurm_one_task_per_node_uses_every_gpu(environ):
    # JAX's own rule would give local_device_ids=[0]: one GPU of eight.
    launch = _slurm(environ, ntasks=2, tasks_per_node="1(x2)", localid=0, cuda_visible="0,1,2,3,4,5,6,7")
    assert launch.kwargs["local_device_ids"] == []


def test_slurm_tasks_sharing_gpus_get_blocks(environ):
    launch = _slurm(environ, ntasks=4, tasks_per_node="2,2", localid=1, cuda_visible="0,1,2,3,4,5,6,7")
    assert launch.kwargs["local_device_ids"] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="3 visible GPUs cannot be split evenly over the 2 SLURM tasks"):
        _slurm(environ, ntasks=4, tasks_per_node="2,2", localid=1, cuda_visible="0,1,2")


def test_slurm_single_task_is_one_process(environ):
    assert _slurm(environ, ntasks=1, tasks_per_node="1", localid=0).kwargs is None


def test_slurm_detection_feeds_jax_coordinator(environ):
    """JAX's SLURM detection fills in what we leave to it (coordinator, ids), keeping our device ids."""
    from jax._src import clusters
    launch = _slurm(environ, ntasks=16, tasks_per_node="8(x2)", localid=5, cuda_visible="5")
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, launch.kwargs["local_device_ids"], launch.kwargs["cluster_detection_method"], 10)
    assert detected == ("gpu001:" + str(4242 % 2**12 + 65535 - 2**12 + 1), 16, 5, [])


def _fake_bin(tmp_path, name: str) -> None:
    """An executable ``name`` that writes its arguments (NUL-separated) to ``tmp_path/name.args``."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {tmp_path}/{name}.args\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _args(tmp_path, name: str) -> list[str]:
    return (tmp_path / f"{name}.args").read_text().split("\0")[:-1]


def test_tpu_pod_script_runs_the_trainer_on_every_worker(tmp_path):
    _fake_bin(tmp_path, "gcloud")
    env = dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}", REPO="https://example.com/grain_jax.git")
    subprocess.run(["bash", "launch/tpu_pod.sh", "my-v5p-64", "us-east5-a", "configs/grain_cc12m.py:variant=B/16",
                    "/mnt/shared/run one", "--config.data.dir=/mnt/shared/cc12m's"], cwd=REPO, env=env, check=True)
    args = _args(tmp_path, "gcloud")
    assert args[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", "--zone=us-east5-a", "--worker=all"]
    remote = next(a for a in args if a.startswith("--command=")).removeprefix("--command=")
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell
    last = remote.strip().splitlines()[-1]
    assert shlex.split(last) == ["python3", "-m", "grain_jax.cli.train", "--config", "configs/grain_cc12m.py:variant=B/16",
                                 "--workdir", "/mnt/shared/run one", "--config.data.dir=/mnt/shared/cc12m's"]


def test_slurm_script_starts_one_trainer_per_gpu(tmp_path):
    _fake_bin(tmp_path, "srun")
    env = dict(os.environ, PATH=f"{tmp_path}/bin:{os.environ['PATH']}", SLURM_SUBMIT_DIR=REPO)
    subprocess.run(["bash", "launch/slurm_gpu.sbatch", "configs/grain_cc12m.py:variant=B/16", "/shared/run",
                    "--config.data.dir=/shared/cc12m"], cwd=REPO, env=env, check=True)
    args = _args(tmp_path, "srun")
    assert args[args.index("python"):] == ["python", "-m", "grain_jax.cli.train", "--config",
                                           "configs/grain_cc12m.py:variant=B/16", "--workdir", "/shared/run",
                                           "--config.data.dir=/shared/cc12m"]
    with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
        directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    # Every task sees all GPUs of its node (NCCL peer access), distributed.py picks one per task.
    assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives
    assert not any(d.startswith("--gpus-per-task") for d in directives)
