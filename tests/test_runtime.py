"""The allocator settings (applied on glibc, never against the user's own), and the worker pool."""

import ctypes.util
import os
import subprocess
import sys

import pytest
import torch

from pkd.runtime import tune_malloc, usable_cores, worker_pool

glibc = pytest.mark.skipif(
    ctypes.util.find_library("c") is None or not sys.platform.startswith("linux"), reason="needs glibc"
)


def _run_fresh(env: dict[str, str]) -> str:
    # A fresh interpreter, so that the settings never leak into the test process.
    code = "from pkd.runtime import tune_malloc; print(tune_malloc())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@glibc
def test_applied_on_glibc():
    env = {"PATH": "/usr/bin:/bin"}
    assert _run_fresh(env).strip() == "True"


@glibc
@pytest.mark.parametrize(
    "setting",
    [{"PKD_TUNE_MALLOC": "0"}, {"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}],
)
def test_users_settings_win(setting):
    assert _run_fresh({"PATH": "/usr/bin:/bin", **setting}).strip() == "False"


def test_opt_out_in_process(monkeypatch):
    monkeypatch.setenv("PKD_TUNE_MALLOC", "0")
    assert tune_malloc() is False


def test_worker_pool_gives_each_worker_its_threads_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with worker_pool(1, threads=2) as pool:
        seen = pool.submit(os.getenv, "OMP_NUM_THREADS").result(), pool.submit(torch.get_num_threads).result()
        assert os.environ["MKL_NUM_THREADS"] == "2"
    assert seen == ("2", 2)
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ


def test_usable_cores():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
