"""ResNet-50 b8x128 fp32 eager channels_last forward (the bench's oracle model and input): wall
and process CPU time (all threads) of 5 forwards after 1, subnormal floats kept (argument 0) or
flushed in every thread (1). Run with OMP_WAIT_POLICY=PASSIVE, so that CPU time is work rather
than spin-waiting, on a machine whose load makes wall times noisy."""

import sys
import time

import torch

from fastres import benchmark as bm

if sys.argv[1] == "1":
    bm.set_flush_denormals(True)
case = bm.Case(bm.BenchConfig("resnet", 50, 8, 128, "fp32", "cpu", "infer"))
model = case.reference.eval().to(memory_format=torch.channels_last)
x = case.x.contiguous(memory_format=torch.channels_last)
wall, cpu = [], []
with torch.no_grad():
    model(x)
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        model(x)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
print(
    f"flush={bm.flushes_denormals()} threads={torch.get_num_threads()} "
    f"wall ms {sorted(round(t * 1e3) for t in wall)} cpu ms {sorted(round(t * 1e3) for t in cpu)}"
)
