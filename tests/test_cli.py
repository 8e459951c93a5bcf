"""utils/cli.py: a UserError is one line whatever it quotes; every entry point ends through ``exit_process``, which
must keep the status and the exit handlers."""

import subprocess
import sys
from pathlib import Path

import pytest

from ropescale.methods import RopeConfigError
from utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("status,code", [("3", 3), ("0", 0), ("None", 0)])
def test_exit_process_keeps_the_status_and_runs_exit_handlers(status, code):
    script = ("import atexit\nfrom utils.cli import exit_process\n"
              f"atexit.register(print, 'handler ran')\nexit_process({status})")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (code, "handler ran\n", "")


@pytest.mark.parametrize("quoted", ["\n", "a\r\nb", "\t", "\x1b[2J", "\u2028", "\x85", "\x0b\x0c\x1c"])
def test_a_user_error_quoting_control_characters_stays_one_line(quoted):
    for error in (UserError, RopeConfigError):
        message = str(error(f"unknown key '{quoted}'; valid keys: a, b"))
        assert message.splitlines() == [message] and message.isprintable()
        assert message.startswith("unknown key '") and message.endswith("'; valid keys: a, b")
    # printable text, non-ASCII included, is kept as written
    assert str(UserError("clé 'é' ‘ok’ 日本")) == "clé 'é' ‘ok’ 日本"
