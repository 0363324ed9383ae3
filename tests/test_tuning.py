"""The persisted choice of Triton launch configurations (`fastres.ops.tuning`), without a GPU:
the timing itself is replaced by a stand-in that picks a random candidate and counts its calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastres.ops import tuning

DEVICE = "Fake GPU | torch 0 | triton 0"


def _candidates() -> list[dict]:
    sizes = torch.randperm(6)[:4].tolist()
    return [{"BLOCK_M": 16 << s, "num_warps": 4} for s in sizes]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A fresh process state, a cache directory of its own and a stand-in for the timing."""
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(tuning, "device_key", lambda device: DEVICE)
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "_CONFIGS", tuning.JsonCache(tuning.CACHE_FILE))
    timed = []

    def fake_tune(key, candidates, launch, compile_only):
        timed.append(key)
        return candidates[int(torch.randint(len(candidates), ()))]

    monkeypatch.setattr(tuning, "_tune", fake_tune)
    return timed


def _choose(key: str, candidates: list[dict]) -> dict:
    return tuning.choose(torch.device("cuda"), key, candidates, launch=None, compile_only=None)


def test_a_choice_is_timed_once_and_persisted(fake_gpu, tmp_path):
    candidates = _candidates()
    chosen = _choose("conv a", candidates)
    assert chosen in candidates and fake_gpu == ["conv a"]
    assert _choose("conv a", candidates) == chosen and fake_gpu == ["conv a"]
    on_disk = json.loads((tmp_path / "cache" / tuning.CACHE_FILE).read_text())
    assert on_disk == {DEVICE: {"conv a": chosen}}
    # Another key of the same device is added to the file, not written over it.
    other = _choose("conv b", candidates)
    on_disk = json.loads((tmp_path / "cache" / tuning.CACHE_FILE).read_text())
    assert on_disk == {DEVICE: {"conv a": chosen, "conv b": other}}


def test_a_new_process_reuses_the_persisted_choice(fake_gpu, tmp_path):
    candidates = _candidates()
    chosen = _choose("conv a", candidates)
    script = f"""
import json, torch
from fastres.ops import tuning
tuning.device_key = lambda device: {DEVICE!r}
def no_tuning(*args):
    raise AssertionError("timed again")
tuning._tune = no_tuning
print(json.dumps(tuning.choose(torch.device("cuda"), "conv a", {candidates!r}, None, None)))
"""
    env = {**os.environ, tuning.CACHE_ENV_VAR: str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == chosen


def test_a_stale_entry_is_timed_again(fake_gpu, tmp_path):
    cache = tmp_path / "cache" / tuning.CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({DEVICE: {"conv a": {"BLOCK_M": 7, "num_warps": 1}}}))
    candidates = _candidates()
    assert _choose("conv a", candidates) in candidates and fake_gpu == ["conv a"]


def test_shipped_defaults_are_used_without_timing(fake_gpu, tmp_path):
    candidates = _candidates()
    shipped = candidates[int(torch.randint(len(candidates), ()))]
    (tmp_path / "shipped").mkdir()
    configs = {"configs": {"conv a": shipped}}
    (tmp_path / "shipped" / "fake-gpu.json").write_text(json.dumps(configs))
    assert _choose("conv a", candidates) == shipped and fake_gpu == []
    assert not (tmp_path / "cache" / tuning.CACHE_FILE).exists()


def test_tuning_off_takes_the_first_candidate(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    candidates = _candidates()
    assert _choose("conv a", candidates) == candidates[0] and fake_gpu == []
    assert not (tmp_path / "cache" / tuning.CACHE_FILE).exists()


def test_an_unwritable_cache_costs_only_a_warning(fake_gpu, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(blocker / "cache"))
    candidates = _candidates()
    assert _choose("conv a", candidates) in candidates
    assert "cannot write the tuning cache" in capsys.readouterr().err


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_dir() == tmp_path / "fastres"
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "mine"))
    assert tuning.cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("elt_bytes", [2, 4])
@pytest.mark.parametrize("limit", [166_912, 232_448, 101_376])
def test_candidates_fit_the_shared_memory_limit(elt_bytes, limit):
    """Every candidate's shared-memory bound fits the GPU's limit, by dropping pipeline stages
    where the tile needs it (the pooled avg_down shortcut's A tile is 4x larger); tiles that
    fit keep their stages."""
    from fastres.kernels.conv2d_configs import candidate_configs, shared_memory_bound

    m, c_in, c_out = 256 * 28 * 28, 512, 1024
    for pool in (1, 2):
        configs = candidate_configs(m, c_in, c_in, c_out, False, elt_bytes, pool, limit)
        unlimited = candidate_configs(m, c_in, c_in, c_out, False, elt_bytes, pool, 10**9)
        assert configs and len(configs) == len(unlimited)
        for config, free in zip(configs, unlimited, strict=True):
            tile = [config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages")]
            assert shared_memory_bound(*tile, pool, elt_bytes) <= limit, config
            if shared_memory_bound(*tile[:3], free["num_stages"], pool, elt_bytes) <= limit:
                assert config == free
            else:
                assert config["num_stages"] < free["num_stages"]
    first_pooled = candidate_configs(m, c_in, c_in, c_out, False, elt_bytes, 2, 166_912)[0]
    assert first_pooled["num_stages"] == 2  # 3 stages measured 180,224 bytes on sm_80
