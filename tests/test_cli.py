"""utils/cli.py: every entry point ends through ``exit_process``; it must keep the status and the exit handlers."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("status,code", [("3", 3), ("0", 0), ("None", 0)])
def test_exit_process_keeps_the_status_and_runs_exit_handlers(status, code):
    script = ("import atexit\nfrom utils.cli import exit_process\n"
              f"atexit.register(print, 'handler ran')\nexit_process({status})")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (code, "handler ran\n", "")
