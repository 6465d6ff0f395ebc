"""Tests of the package surface: the public names, and a light import for the command line."""

import subprocess
import sys

import pkd


def test_public_names_resolve():
    assert pkd.__all__ == sorted(pkd._EXPORTS)
    for name in pkd.__all__:
        assert getattr(pkd, name) is not None
    assert "pkd_loss" in dir(pkd)


def test_unknown_attribute():
    try:
        pkd.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_cli_does_not_load_torch():
    code = "import sys, pkd, pkd.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"
