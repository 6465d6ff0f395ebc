"""The allocator settings (applied on glibc, never against the user's own), and the worker pool."""

import ctypes.util
import os
import signal
import subprocess
import sys
import time

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


_STOPPED_BY_SIGTERM = """
import os, sys, time
from pathlib import Path
from pkd.runtime import worker_pool

def nap(folder, name):
    (Path(folder) / (name + ".began")).write_text(str(os.getpid()))
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        (Path(folder) / (name + ".interrupted")).write_text("")
        raise

if __name__ == "__main__":
    with worker_pool(1) as pool:
        futures = [pool.submit(nap, sys.argv[1], "first"), pool.submit(nap, sys.argv[1], "queued")]
        futures[0].result()
"""


def test_sigterm_reaches_the_workers_and_queued_work_never_starts(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(_STOPPED_BY_SIGTERM)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    began = tmp_path / "first.began"
    deadline = time.monotonic() + 60
    while not began.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert began.is_file(), "the worker never started"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) != 0
    assert (tmp_path / "first.interrupted").is_file()  # the worker's run saw a Ctrl-C: it could save and stop
    assert not (tmp_path / "queued.began").exists()
    worker = int(began.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # no orphan left running
