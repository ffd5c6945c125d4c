"""The compiled extension's link: it must use the process's shared libstdc++.

A copy of libstdc++ linked into lgc_fast._C (what the GPU machine's compiler did before setup.py named the shared
library, session 29) formats c10's error messages with locale state it never initialised: every native argument
error that prints a number crashed the process instead of raising.
"""
import importlib
import shutil
import subprocess
import sys

import pytest

import lgc_fast


def _extension_path() -> str:
    if not lgc_fast.backends()["cpu"][0]:
        pytest.skip("compiled extension not available")
    return importlib.import_module("lgc_fast._C").__file__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is the Linux C++ runtime")
@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("nm") is None, reason="binutils not installed")
def test_extension_links_the_shared_libstdcxx():
    path = _extension_path()
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, f"{path} does not need libstdc++.so.6"
    defined = subprocess.run(["nm", "-C", "--defined-only", path], capture_output=True, text=True).stdout
    # std::locale::classic() is compiled into libstdc++ itself, never instantiated from a header: defined here, it
    # comes from a static copy of the library
    own = [line for line in defined.splitlines() if line.endswith(" std::locale::classic()")]
    assert not own, f"{path} carries its own copy of libstdc++ ({own[0]})"
