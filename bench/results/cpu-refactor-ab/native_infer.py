import time, torch, fastres, sys
torch.manual_seed(0)
m = fastres.ResNet(depth=50).eval().to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
import os
with torch.no_grad():
    for _ in range(3): m(x)
    ts = []
    for _ in range(15):
        t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
ts.sort()
print(sys.argv[1], os.environ.get("FASTRES_BACKEND"), f"min {ts[0]*1e3:.1f} med {ts[7]*1e3:.1f}", fastres.__file__)
