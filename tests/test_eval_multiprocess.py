"""Zero-shot and retrieval evaluation split over 2 local processes (jax.distributed, CPU, 2 devices each):
the same numbers as one process with 4 devices, and each process reads only its share of the images."""
import json
import os
import sys

import portpicker

import _train_utils
from grain_jax.configs import demo
from grain_jax.data.synthetic import ensure_synthetic
from grain_jax.evaluators import datasets

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_eval_process.py")


def _run(synthetic_dir: str, captions: str, processes: int) -> list[dict]:
    """Every process's RESULT line, in process order."""
    command = [sys.executable, SCRIPT, synthetic_dir, captions]
    devices = f"--xla_force_host_platform_device_count={4 // processes}"
    env = {}
    if processes > 1:
        env = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{portpicker.pick_unused_port()}",
                   JAX_NUM_PROCESSES=str(processes))
    children = [_train_utils.start(command, XLA_FLAGS=devices, **env, **({"JAX_PROCESS_ID": str(i)} if env else {}))
                for i in range(processes)]
    outputs = [child.communicate(timeout=900)[0] for child in children]
    for child, output in zip(children, outputs):
        assert child.returncode == 0, output
    return [json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
            for output in outputs]


def test_two_processes_give_one_process_numbers_and_split_the_images(tmp_path):
    synthetic_dir = ensure_synthetic(str(tmp_path / "synthetic"), **demo.get_config("runlocal").synthetic)
    novel = datasets.classification_dataset("synthetic:novel", synthetic_dir=synthetic_dir)
    names = [novel.class_names[novel.source[i][1]] for i in range(len(novel))]
    captions = tmp_path / "captions.json"  # all novel images but the last (an odd count), captioned with their class
    captions.write_text(json.dumps([{"image": novel.source.describe(i), "captions": [f"a {name}", name]}
                                    for i, name in enumerate(names[:-1])]))
    (one,) = _run(synthetic_dir, str(captions), processes=1)
    two = _run(synthetic_dir, str(captions), processes=2)

    for process in two:
        assert process["zeroshot"] == one["zeroshot"]
        assert process["retrieval"] == one["retrieval"]
    assert one["zeroshot"]["count"] == len(novel) == 20 and one["retrieval"]["num_images"] == 19
    for task, count in (("zeroshot", 20), ("retrieval", 19)):  # contiguous blocks: 10 + 10, 10 + 9 (padded)
        assert [process["read"][task] for process in two] == [list(range(10)), list(range(10, count))]
        assert one["read"][task] == list(range(count))
