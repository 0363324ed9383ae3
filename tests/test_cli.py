"""`python -m fastres {bench,tune,profile,info}` on tiny configurations."""

import json
import mmap
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastres import available_backends, cpu_cache
from fastres import benchmark as bm
from fastres.__main__ import main
from fastres.benchmark.schedule import Prepared

TINY = ["--depth", "18", "--batch", "2", "--image-size", "32", "--iters", "2", "--warmup", "1"]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP spin-waiting makes tiny models
    a hundred times slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_prints_table_and_writes_json(tmp_path, capsys, one_thread):
    path = tmp_path / "out.json"
    code = main(["bench", *TINY, "--model", "both", "--no-compile", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "skipping res2net" in out  # Res2Net has no depth 18
    systems = ["eager", "eager-cl"] + [f"fastres-{b}" for b in bm.default_backends("cpu")]
    for group in ("resnet18-b2x32-fp32-infer", "resnet18-b2x32-fp32-train"):
        rows = [line.split() for line in out.splitlines() if line.startswith(group)]
        assert [row[1] for row in rows] == systems
        assert all(row[7] == "ok" for row in rows)
        # The peak-memory ratio column: eager-cl over itself, where the peak could be measured.
        assert rows[1][5] in ("1.00x", "-")

    payload = json.loads(path.read_text())
    assert payload["environment"]["device_type"] == "cpu"
    assert payload["environment"]["versions"]["torch"] == torch.__version__
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))}
    assert payload["environment"]["openmp_env"] == omp
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    assert malloc.items() <= payload["environment"]["allocator_env"].items()
    assert payload["settings"]["batch"] == 2 and payload["settings"]["compile_modes"] == []
    results = payload["results"]
    assert len(results) == 2 * len(systems)
    for r in results:
        assert r["img_per_s"] > 0 and len(r["times_ms"]) == 2
        assert r["img_per_s"] == pytest.approx(2e3 / r["ms_per_iter"])
        assert r["check_passed"] and 0 < r["max_error"] < 1
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
        assert r["page_faults_per_iter"] >= 0  # Linux counts them
    baseline = {r["group"]: r["img_per_s"] for r in results if r["system"] == "eager-cl"}
    peaks = {r["group"]: r["peak_memory_bytes"] for r in results if r["system"] == "eager-cl"}
    for r in results:
        assert r["speedup"] == pytest.approx(r["img_per_s"] / baseline[r["group"]])
        if r["peak_memory_bytes"] is not None and peaks[r["group"]]:
            assert r["memory_ratio"] == pytest.approx(r["peak_memory_bytes"] / peaks[r["group"]])
        else:
            assert r["memory_ratio"] is None
    train = [r for r in results if r["mode"] == "train"]
    # The worst of the logits, loss, every gradient and every running statistic.
    assert all(r["worst_tensor"] for r in train)
    # Subnormal floats are kept by default, and a forward of random weights on a random batch
    # makes none.
    assert "subnormal floats kept" in out
    assert payload["settings"]["flush_denormals"] is False
    assert all(r["denormals_flushed"] is False for r in results)
    for group in ("resnet18-b2x32-fp32-infer", "resnet18-b2x32-fp32-train"):
        assert payload["settings"]["subnormal_activations"][group]["subnormal"] == 0
        assert f"{group} 0 of " in out


def test_tune_chooses_every_layer_and_a_second_run_reuses_the_choices(
    tmp_path, capsys, monkeypatch, one_thread
):
    """`tune` reports every layer's choice with the timed candidates, persists them, and a
    second run (the next process, or `bench`) finds them all chosen."""
    from fastres.backends import select
    from fastres.ops import tuning

    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))
    path = tmp_path / "tune.json"
    args = ["tune", "--depth", "18", "--batch", "2", "--image-size", "32", "--model", "resnet"]
    assert main([*args, "--json", str(path)]) == 0
    groups = json.loads(path.read_text())["groups"]
    expected = ["resnet18-b2x32-fp32-infer", "resnet18-b2x32-fp32-train"]
    assert [g["group"] for g in groups] == expected
    names = set(select.candidate_names())
    for group in groups:
        layers = {row["layer"] for row in group["layers"]}
        assert "layer4.1" in layers or "layer4.1.conv2" in layers, layers
        assert all(row["chosen"] in names for row in group["layers"])
        tuned = [row for row in group["layers"] if row["how"] == "tuned"]
        assert tuned and all(row["chosen"] in row["times_ms"] for row in tuned)
    assert (tmp_path / "cache" / select.SELECTION_FILE).exists()
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))
    assert main([*args, "--json", str(path)]) == 0
    hows = {row["how"] for g in json.loads(path.read_text())["groups"] for row in g["layers"]}
    assert hows <= {"persisted", "cached", "only"}, hows
    assert "chosen:" in capsys.readouterr().out


def test_bench_detection_preset(tmp_path, capsys, one_thread):
    """The backbone as mmdet trains it: frozen stem and stage 1, BatchNorm frozen, the four
    stage outputs checked, odd image sizes padded to multiples of 32."""
    path = tmp_path / "det.json"
    args = ["--preset", "detection", "--depth", "18", "--batch", "1", "--image-size", "50x70"]
    code = main(
        ["bench", *args, "--model", "resnet", "--iters", "1", "--no-compile", "--json", str(path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    payload = json.loads(path.read_text())
    assert payload["settings"]["preset"] == "detection"
    assert payload["settings"]["image_size"] == [64, 96]
    results = payload["results"]
    assert {r["group"] for r in results} == {
        "resnet18-det-b1x64x96-fp32-infer",
        "resnet18-det-b1x64x96-fp32-train",
    }
    for r in results:
        assert r["check_passed"] and r["preset"] == "detection" and r["image_width"] == 96
    case = bm.Case(bm.BenchConfig("resnet", 18, 1, 64, mode="train", preset="detection"))
    assert case.reference.frozen_stages == 1 and case.reference.norm_eval
    gold = case.gold()
    assert [k for k in gold if k.startswith("stage")] == [f"stage {i}" for i in range(4)]
    # The frozen stem and stage 1 get no gradients; every BatchNorm keeps its statistics.
    assert not any(k.startswith(("grad conv1", "grad bn1", "grad layer1")) for k in gold)
    assert any(k.startswith("grad layer2") for k in gold)
    for name, buf in case.reference.named_buffers():
        if name.endswith("running_mean"):
            assert torch.equal(gold[name], buf.double()), name


def test_image_size_argument():
    assert bm.parse_image_size("224") == (224, 224)
    assert bm.parse_image_size("800x1333") == (800, 1333)
    assert bm.input_size("detection", 800, 1333) == (800, 1344)
    assert bm.input_size("classification", 100, 130) == (100, 130)
    for bad in ("0", "8x", "axb", "-3x4"):
        with pytest.raises(ValueError, match="H or HxW|positive"):
            bm.parse_image_size(bad)
    with pytest.raises(SystemExit):
        main(["bench", "--image-size", "12x"])


def _result(group: str, system: str, img_per_s: float, peak: int | None) -> bm.Result:
    return bm.Result(
        group=group, model=group.split("-")[0], mode="train", system=system, backend="torch",
        batch=8, image_size=32, image_width=32, preset="classification", dtype="fp32",
        device="cpu", img_per_s=img_per_s,
        ms_per_iter=8e3 / img_per_s, times_ms=[8e3 / img_per_s], first_call_s=1.0,
        max_error=1e-6, worst_tensor="logits", check_passed=True, check_failures=[],
        worst_grad_error=None, worst_grad=None, peak_memory_bytes=peak, memory_kind="test",
    )  # fmt: skip


def test_speedup_and_memory_ratio_over_eager_cl():
    """Both ratios divide by eager-cl of the same group; an unmeasured peak gives no ratio."""
    mib = 2**20
    peak_a, peak_b = torch.randint(1, 1000, (2,)).tolist()
    results = [
        _result("resnet50-a", "eager", 50.0, 3 * peak_a * mib),
        _result("resnet50-a", "eager-cl", 100.0, 2 * peak_a * mib),
        _result("resnet50-a", "fastres-triton", 150.0, peak_a * mib),
        _result("resnet50-b", "eager-cl", 10.0, peak_b * mib),
        _result("resnet50-b", "fastres-native", 30.0, None),
        _result("resnet50-c", "fastres-native", 30.0, mib),  # no eager-cl in its group
    ]
    bm.add_speedups(results)
    assert [r.speedup for r in results] == pytest.approx([0.5, 1, 1.5, 1, 3, None])
    ratios = [r.memory_ratio for r in results]
    assert ratios[:4] == pytest.approx([1.5, 1, 0.5, 1]) and ratios[4:] == [None, None]
    lines = bm.format_table(results).splitlines()
    assert lines[0].split()[4:7] == ["speedup", "mem", "ratio"] and lines[0].endswith("faults/it")
    cells = {(row[0], row[1]): row[4:6] for row in (line.split() for line in lines[2:])}
    assert cells["resnet50-a", "fastres-triton"] == ["1.50x", "0.50x"]
    assert cells["resnet50-b", "fastres-native"] == ["3.00x", "-"]
    assert cells["resnet50-c", "fastres-native"] == ["-", "-"]


def test_bench_process_options_exclude_each_other():
    with pytest.raises(SystemExit, match="exclude each other"):
        main(["bench", *TINY, "--same-process", "--process-per-system"])


def test_bench_rejects_unavailable_backend(one_thread):
    reasons = bm.backend_reasons("cpu")
    missing = [name for name, reason in reasons.items() if reason is not None]
    assert "triton" in missing  # only interpreted on CPU: never timed
    with pytest.raises(SystemExit, match="cannot run on cpu"):
        main(["bench", *TINY, "--backend", missing[0]])


@pytest.mark.skipif(not available_backends()["native"].available, reason="needs fastres._C")
@pytest.mark.parametrize("isolate", [True, False])
def test_run_group_gives_each_system_its_own_process_on_request(isolate, one_thread):
    """Isolated, the native system's CPU block cache is its process's, not this one's."""
    config = bm.BenchConfig("resnet", 18, batch=4, image_size=64, mode="train")
    case = bm.Case(config, seed=3)
    before = cpu_cache.stats()
    systems = [bm.EAGER_CL, bm.fastres_system("native")]
    results = bm.run_group(case, systems, iters=2, warmup=1, isolate=isolate)
    assert [r.system for r in results] == ["eager-cl", "fastres-native"]
    assert all(r.check_passed and len(r.times_ms) == 2 for r in results)
    assert all(r.page_faults_per_iter >= 0 for r in results)  # counted in either process
    used_here = cpu_cache.stats().hits + cpu_cache.stats().misses > before.hits + before.misses
    assert used_here != isolate


def _prepared(step) -> Prepared:
    runner = SimpleNamespace(step=step, device=torch.device("cpu"))
    return Prepared(
        runner,
        check=None,
        first_call_s=0.0,
        peak_memory_bytes=None,
        memory_kind="",
        denormals_flushed=False,
    )


def test_a_step_counts_the_page_faults_it_takes():
    """A timed step's page faults are the first touches of fresh memory during it."""
    pages = int(torch.randint(300, 600, ()))

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as buf:
            for i in range(pages):
                buf[i * mmap.PAGESIZE] = 1

    sample = _prepared(touch_fresh_pages).run_timed_step()
    assert sample.seconds > 0
    assert pages <= sample.page_faults < pages + 100
    assert _prepared(lambda: None).run_timed_step().page_faults < 20


@pytest.mark.parametrize("isolate", [True, False])
def test_a_system_that_fails_is_reported_and_the_others_timed(isolate, one_thread):
    config = bm.BenchConfig("resnet", 18, batch=2, image_size=32, mode="infer")
    broken = bm.System("broken", backend="no-such-backend")
    systems = [broken, bm.EAGER_CL]
    results = bm.run_group(bm.Case(config), systems, iters=2, warmup=0, isolate=isolate)
    assert [r.system for r in results] == ["broken", "eager-cl"]
    failed, timed = results
    assert not failed.check_passed and failed.times_ms == [] and failed.worst_tensor == "error"
    assert "no-such-backend" in failed.check_failures[0]
    if isolate:
        assert "broken failed in its benchmark process" in failed.check_failures[0]
    assert timed.check_passed and len(timed.times_ms) == 2
    assert "FAIL" in bm.format_table(results)


def test_check_catches_a_wrong_system(one_thread):
    config = bm.BenchConfig("resnet", 18, batch=2, image_size=32, mode="infer")
    case = bm.Case(config, seed=1)
    runner = case.runner(bm.fastres_system("torch"))
    good = case.check(runner)
    assert good.passed and good.max_error < 1e-5
    with torch.no_grad():
        runner.model.layer3[1].conv2.weight.mul_(1.01)
    bad = case.check(runner)
    assert not bad.passed and bad.worst == "logits" and bad.max_error > good.max_error


def test_train_check_covers_running_stats_and_gradients(one_thread):
    config = bm.BenchConfig("resnet", 18, batch=4, image_size=32, mode="train")
    case = bm.Case(config, seed=2)
    good = case.check(case.runner(bm.EAGER))
    assert good.passed and good.worst_grad and good.worst_grad_error > 0
    runner = case.runner(bm.EAGER)
    runner.model.layer2[0].bn1.momentum = 0.2  # a wrong running-statistics update
    bad = case.check(runner)
    assert not bad.passed and bad.worst.startswith("layer2.0.bn1.running_")
    runner = case.runner(bm.EAGER)
    runner.model.fc.weight.register_hook(lambda g: 2 * g)  # a wrong gradient
    bad = case.check(runner)
    assert not bad.passed and bad.worst == bm.ALL_GRADS and bad.worst_grad == "fc.weight"


def test_profile_writes_trace(tmp_path, capsys, one_thread):
    trace = tmp_path / "trace.json"
    args = ["profile", *TINY, "--mode", "train", "--trace", str(trace)]
    assert main([*args, "--profile-iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "Self CPU" in out
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # The named ranges from the forward hooks: the stem, each stage, each block.
    assert {"stem", "layer1", "layer1.0", "layer4.1", "iteration"} <= names


def test_device_busy_time_counts_overlapping_kernels_once():
    """The GPU-busy figure of `fastres profile`: the union of the kernels' intervals, so that
    kernels of two streams running together do not make the device busier than the wall."""
    from fastres.profiling import busy_us

    starts = torch.rand(20).double() * 100
    intervals = [(float(a), float(a + d)) for a, d in zip(starts, torch.rand(20).double() * 10)]
    covered = torch.zeros(12_000, dtype=torch.bool)  # a 0.01 us grid over 0..120 us
    for a, b in intervals:
        covered[round(a * 100) : round(b * 100)] = True
    assert busy_us(intervals) == pytest.approx(int(covered.sum()) / 100, abs=0.2)
    assert busy_us([(0.0, 10.0), (2.0, 4.0), (10.0, 12.0)]) == 12.0
    assert busy_us([]) == 0.0


@pytest.mark.parametrize("mode", bm.MODES)
def test_subnormal_activations_are_counted(mode, one_thread):
    """An input below float32's smallest normal value makes the stem convolution's output
    subnormal: every nonzero value of it is counted (and BatchNorm lifts the rest)."""
    case = bm.Case(bm.BenchConfig("resnet", 18, batch=2, image_size=32, mode=mode))
    assert bm.count_subnormal_activations(case)[0] == 0
    case.x = case.x * torch.finfo(torch.float32).tiny / 1000
    stem = {}
    hook = case.reference.conv1.register_forward_hook(lambda m, i, out: stem.update(out=out))
    subnormal, values = bm.count_subnormal_activations(case)
    hook.remove()
    # The hook is copied with the model; `stem` holds the runner's conv1 output.
    assert stem["out"].abs().max() < torch.finfo(torch.float32).tiny
    assert int((stem["out"] != 0).sum()) <= subnormal < values


def test_bench_flushes_denormals_in_every_systems_threads(tmp_path):
    """--flush-denormals: each system's process (two intra-op threads) flushes them, and the
    JSON says so, per result and in the settings."""
    path = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    args = [*TINY, "--iters", "1", "--warmup", "0", "--model", "resnet", "--mode", "infer"]
    run = subprocess.run(
        [sys.executable, "-m", "fastres", "bench", *args, "--no-compile", "--backend", "torch",
         "--flush-denormals", "--json", str(path)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "subnormal floats flushed to zero in every system's threads" in run.stdout
    payload = json.loads(path.read_text())
    assert payload["settings"]["flush_denormals"] is True
    results = payload["results"]
    assert [r["system"] for r in results] == ["eager", "eager-cl", "fastres-torch"]
    assert all(r["denormals_flushed"] is True and r["check_passed"] for r in results)


def test_threads_that_disagree_on_flushing_are_reported():
    """The OpenMP threads keep the flush setting they were created with: set in the main
    thread alone, it is caught, not reported as flushed or kept."""
    code = (
        "import torch; from fastres.benchmark import denormals as d\n"
        "torch.set_num_threads(2)\n"
        "d.set_flush_denormals(True)\n"  # before the first parallel op: every thread
        "assert d.flushes_denormals()\n"
        "torch.set_flush_denormal(False)\n"  # the main thread only
        "try:\n"
        "    d.flushes_denormals()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "only some of the 2 intra-op threads flush subnormal floats" in run.stdout


def test_info_and_help_in_a_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    info = subprocess.run(
        [sys.executable, "-m", "fastres", "info"], capture_output=True, text=True, env=env
    )
    assert info.returncode == 0, info.stderr
    for name, status in available_backends().items():
        assert f"{name:7s} {'available' if status.available else 'unavailable'}" in info.stdout
    assert torch.__version__ in info.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "fastres", "--help"], capture_output=True, text=True, env=env
    )
    assert helped.returncode == 0 and all(c in helped.stdout for c in ("bench", "profile", "info"))
