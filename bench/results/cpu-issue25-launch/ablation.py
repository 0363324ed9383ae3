"""scripts/host_cost.py with one of issue 25's launch-path changes switched off (or none).

    PYTHONPATH=<checkout> python ablation.py <checkout>/scripts <variant>

Variants: `all` (as committed), `no-dispatch-bypass` (every custom op through the dispatcher:
`dispatch_free` always False), `no-direct-launch` (every launch through Triton's JIT:
`DirectLaunch` built as for an unknown Triton version), `no-prepared` (every call prepares
again: verdict, configuration and launch worked out anew, so the JIT launches too), `base` (a
checkout without these changes: nothing patched). Prints host_cost.py's rows (infer and the
training forward, no backward) as JSON lines, tagged with the variant.
"""

import json
import sys

sys.argv, scripts, variant = sys.argv[:1], sys.argv[1], sys.argv[2]
sys.path.insert(0, scripts)

import host_cost  # noqa: E402  (pops TRITON_INTERPRET, sets FASTRES_TRITON_TUNE=0)
import torch  # noqa: E402

if variant != "base":
    from fastres.ops import conv2d_fused, launcher

    if variant == "no-dispatch-bypass":
        conv2d_fused.dispatch_free = lambda inputs: False
    elif variant == "no-direct-launch":
        launcher._DIRECT = False
    elif variant == "no-prepared":

        class Forgetful(dict):
            def get(self, key, default=None):
                return default

        conv2d_fused._PREPARED = Forgetful()
    elif variant != "all":
        raise SystemExit(f"unknown variant {variant}")

torch.set_num_threads(1)
torch.set_flush_denormal(True)
with host_cost.Recorder(all_candidates=False).patched(host_cost.ARCH):
    for name in host_cost.WORKLOADS:
        for row in host_cost.measure(name, 3, 2, ("infer", "train"), backward=False):
            print(json.dumps({"variant": variant, **row}), flush=True)
