"""Whole-model benchmarks: ResNet-50 and Res2Net-50, inference and training step.

Every available fastres backend against PyTorch eager (NCHW and channels_last) and torch.compile
of the same oracle model. Each benchmark checks its system once against the float64 oracle
(docs/contract.md §3), then times it; the group is `<model>-b<batch>x<size>-<dtype>-<mode>`.

    pytest bench/ --benchmark-only
    FASTRES_BENCH_IMAGE_SIZE=224 pytest bench/ --benchmark-only -k res2net   # the targets' size
    pytest bench/ --benchmark-only --bench-preset detection -k train  # mmdet's backbone training
"""

from __future__ import annotations

import pytest

from fastres import benchmark as bm

# Systems are the innermost parameter so that one case's systems run back to back and share
# its gold and base outputs.
SYSTEMS = [*bm.PEERS, *(bm.fastres_system(b) for b in ("torch", "native", "triton", "auto"))]


@pytest.mark.parametrize("system", SYSTEMS, ids=[s.name for s in SYSTEMS])
@pytest.mark.parametrize("mode", bm.MODES)
@pytest.mark.parametrize("model", ["resnet", "res2net"])
def test_model(benchmark, bench_settings, bench_results, case_cache, model, mode, system):
    settings = bench_settings
    if system.compiled and not settings.compiles(mode):
        pytest.skip(f"torch.compile of the {mode} step is off (--bench-compile={settings.compile})")
    if system.name.startswith("fastres-"):
        reason = bm.backend_reasons(settings.device)[system.backend]
        if reason is not None:
            pytest.skip(f"backend {system.backend}: {reason}")
        if system.backend not in bm.default_backends(settings.device):
            pytest.skip("backend torch is the oracle, the same computation as eager-cl")
    config = bm.config_from_args(settings, model, mode)
    case = case_cache.get(config)
    device = case.device

    def timer(step):
        def synced_step():
            step()
            bm.synchronize(device)

        # run_system has already run the warmup steps (measuring the peak memory there).
        benchmark.pedantic(synced_step, rounds=settings.rounds, warmup_rounds=0, iterations=1)
        # pytest-benchmark keeps no stats when disabled (a plain `pytest bench/` run).
        stats = getattr(benchmark, "stats", None)
        return list(stats.stats.data) if stats else bm.time_steps(step, device, 1, 0)

    benchmark.group = config.group
    result = bm.run_system(case, system, settings.rounds, settings.warmup, timer=timer)
    bench_results.append(result)
    benchmark.extra_info.update(
        device=bm.device_name(device),
        img_per_s=result.img_per_s,
        max_error=result.max_error,
        worst_tensor=result.worst_tensor,
        check_passed=result.check_passed,
        peak_memory_bytes=result.peak_memory_bytes,
        memory_kind=result.memory_kind,
        first_call_s=result.first_call_s,
    )
    assert result.check_passed, "\n".join(result.check_failures)
