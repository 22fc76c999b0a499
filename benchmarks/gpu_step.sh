#!/usr/bin/env bash
# GRAIN B/16 train step on one GPU in bf16 at the largest global batch that fits, with MFU.
#
#     bash benchmarks/gpu_step.sh            # batches tried: 512 384 256 192 128 64 32
#     BATCHES="256 128" STEPS=20 bash benchmarks/gpu_step.sh
#
# For each batch (largest first) runs benchmarks/train_step.py (the trainer's own AOT-compiled step on
# a fixed random batch; MFU = XLA's FLOPs of the compiled step / step time / the device's peak in
# grain_jax.train.metrics.PEAK_FLOPS_PER_DEVICE) until one fits in memory, then times that batch
# again with each attention path (cuDNN flash via jax.nn.dot_product_attention, XLA's, explicit).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
BATCHES="${BATCHES:-512 384 256 192 128 64 32}"
STEPS="${STEPS:-10}"
CONFIG="configs/grain_cc12m.py:variant=B/16"

python -c "import jax; print(jax.devices())" || exit 1
fits=""
for batch in $BATCHES; do
  echo "== global batch $batch (attention_impl=auto)"
  if python benchmarks/train_step.py --config="$CONFIG" --config.global_batch_size="$batch" \
      --config.dtype=bfloat16 --steps="$STEPS" 2>&1 | tee /tmp/gpu_step_$batch.log | grep -E "^grain|^compile"; then
    if grep -q "MFU" /tmp/gpu_step_$batch.log; then fits=$batch; break; fi
  fi
  grep -m1 -iE "resource_exhausted|out of memory" /tmp/gpu_step_$batch.log || tail -3 /tmp/gpu_step_$batch.log
done
[ -n "$fits" ] || { echo "no batch in ($BATCHES) fits"; exit 1; }
echo "== largest batch that fits: $fits; attention paths side by side"
for impl in cudnn xla explicit; do
  echo "-- attention_impl=$impl"
  python benchmarks/train_step.py --config="$CONFIG" --config.global_batch_size="$fits" --config.dtype=bfloat16 \
    --config.model.attention_impl="$impl" --steps="$STEPS" 2>&1 | grep -E "^compile|Error" | tail -2
done
