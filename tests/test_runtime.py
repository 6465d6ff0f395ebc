"""The allocator settings: applied on glibc, and never against the user's own settings."""

import ctypes.util
import subprocess
import sys

import pytest

from pkd.runtime import tune_malloc

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
