"""The `lgc-fast` command's entry (lgc_fast/cli.py): what happens before a subcommand runs."""
import subprocess
import sys

import lgc_fast.cli as cli


def test_the_command_module_imports_no_torch():
    """The console script imports lgc_fast.cli before main runs; with torch still unimported there, a Ctrl-C during
    torch's import (seconds) reaches main's handler instead of printing a traceback."""
    code = "import sys, lgc_fast.cli; print(sorted(m for m in ('torch', 'numpy', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_while_the_subcommands_import_is_one_line(monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "lgc-fast: interrupted\n"
