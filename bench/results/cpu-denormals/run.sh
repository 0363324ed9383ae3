#!/bin/sh
# ResNet-50 b8x128 fp32 inference on CPU, subnormal floats kept and flushed (--flush-denormals):
# the header's subnormal count and every system's time, each system in its own process.
cd "$(dirname "$0")/../../.."
out=bench/results/cpu-denormals
for flag in "" --flush-denormals; do
  name=kept; [ -n "$flag" ] && name=flushed
  .venv/bin/python -m fastres bench --model resnet --mode infer --no-compile --backend native \
    --iters 5 $flag --json "$out/resnet50-b8x128-infer-$name.json" > "$out/resnet50-b8x128-infer-$name.txt" 2>&1
done
