import time, copy, torch, statistics, sys
from fastres.benchmark.case import build_model
torch.manual_seed(0)
base = build_model("resnet", 50).to(memory_format=torch.channels_last).train()
x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
models = {n: copy.deepcopy(base).set_backend(n) for n in ("native", "auto")}
def step(m):
    out = m(x)
    (out[-1] if isinstance(out, (list, tuple)) else out).float().mean().backward()
for n, m in models.items():
    t = time.perf_counter(); step(m); print(n, "first", round(time.perf_counter() - t, 2), flush=True)
times = {n: [] for n in models}
for r in range(6):
    for n, m in (models.items() if r % 2 == 0 else reversed(list(models.items()))):
        t = time.perf_counter(); step(m); times[n].append(time.perf_counter() - t)
for n, ts in times.items(): print(n, "median ms", round(statistics.median(ts) * 1e3, 1), "min", round(min(ts) * 1e3, 1))
