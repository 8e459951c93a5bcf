"""Helpers shared by the benches: peak RSS of this process, the machine's description, corpus tokens, and child
processes (each measurement runs in its own process, so that its peak memory is its own).

Peak RSS is the kernel's high-water mark ``VmHWM`` from ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux), so a measurement can exclude what came before it
(imports, loading the model, earlier steps).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError


def parse_list(text: str, item, what: str) -> list:
    """A comma-separated option (``--lengths 4096,8192``) checked as a non-empty ``list[item]`` (``item`` e.g.
    utils.schema.Length or Depth, the bounds the configs use); a bad one ends the benchmark with one error line."""
    try:
        values = TypeAdapter(list[item]).validate_python([v.strip() for v in text.split(",") if v.strip()])
    except ValidationError as e:
        raise SystemExit(f"error: {what}: {e.errors()[0]['msg']} (got '{text}')") from None
    if not values:
        raise SystemExit(f"error: {what} names no value (got '{text}')")
    return values


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak-RSS mark (VmHWM) to the current RSS; returns the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def emit_record(record: dict, out: str | None) -> None:
    """A bench's last line: its whole record as one JSON line on stdout (and in ``out`` when given)."""
    line = json.dumps(record)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")
    print(line)


def corpus_tokens(tokenizer, n: int, split: str = "train") -> torch.Tensor:
    """The first ``n`` tokens (no special tokens) of the bundled corpus's ``split``, documents in manifest order."""
    from data.corpus import load_corpus

    # A BPE token is about 4 characters of English and a byte-level one at most 1: 8n characters are plenty, and
    # tokenizing whole books (millions of characters) would cost more than some measurements.
    text = "\n\n".join(d.text for d in load_corpus(split))[: 8 * n]
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) < n:
        raise SystemExit(f"error: the bundled {split} split has {len(ids)} tokens, fewer than {n}")
    return torch.tensor(ids[:n])


@dataclass
class Child:
    """A finished child process: exit status, output, the peak RSS polled from outside, whether the cap killed it."""

    what: str
    returncode: int
    stdout: str
    stderr: str
    polled_peak_mib: float
    over_cap: bool

    def result(self) -> dict:
        """The JSON object the child printed last; a failed child ends the bench with the tail of its stderr."""
        if self.over_cap or self.returncode != 0:
            raise SystemExit(f"error: {self.what} failed (exit status {self.returncode}):\n{self.stderr[-3000:]}")
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"error: {self.what} printed no JSON result:\n{self.stdout[-2000:]}")


def _tree_rss_mib(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def run_children(cmds: list[list[str]], what: str, envs: list[dict] | None = None, cap_mib: float | None = None,
                 poll_s: float = 0.05) -> list[Child]:
    """Run ``cmds`` together and wait for all of them (several for a multi-process job).

    Every ``poll_s`` seconds the RSS of all their process trees is summed; with ``cap_mib``, all of them are
    SIGKILLed as soon as that sum exceeds the cap (``over_cap``). Output goes to temporary files, not pipes, so that
    a chatty child never blocks while we poll.
    """
    envs = envs or [dict(os.environ) for _ in cmds]
    procs, outs = [], []
    for cmd, env in zip(cmds, envs):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        # Own session: a kill reaches the child's own children too (its process group), and nothing else.
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True))
        outs.append((out, err))
    peak, over = 0.0, False
    while any(p.poll() is None for p in procs):
        rss = sum(_tree_rss_mib(p.pid) for p in procs if p.poll() is None)
        peak = max(peak, rss)
        over = cap_mib is not None and rss > cap_mib
        # A rank that failed leaves the others waiting in a collective for ever: stop them too.
        failed = any(p.poll() not in (None, 0) for p in procs)
        if over or failed:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(poll_s)
    children = []
    for p, (out, err) in zip(procs, outs):
        out.seek(0)
        err.seek(0)
        children.append(Child(what, p.wait(), out.read(), err.read(), peak, over))
        out.close()
        err.close()
    return children
