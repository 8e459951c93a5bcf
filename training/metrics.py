"""A run's bookkeeping on rank 0: one JSON object per optimizer step in ``metrics.jsonl``, the progress bar, the
periodic log line, and W&B (offline unless an API key is configured)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from configs.schema import RunConfig
from training.checkpoint import public_config
from training.runtime import log
from utils.files import write_atomic


def init_wandb(cfg: RunConfig, run: Path, resumed: bool):
    """The W&B run, or None when disabled. ``mode: auto`` is online only when an API key is configured (the
    ``WANDB_API_KEY`` variable or a netrc entry), else offline: with neither, wandb's online mode fails at once."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return None
    mode = cfg.wandb.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or netrc_has_wandb()
        mode = "online" if has_key else "offline"
        log(f"wandb: {mode} ({'an API key is configured' if has_key else 'no API key configured'})")
    import wandb

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run.name,
                      group=cfg.wandb.group, tags=list(cfg.wandb.tags), config=public_config(cfg), dir=str(run),
                      mode=mode, id=wandb_id(run), resume="allow" if resumed else None)


def netrc_has_wandb() -> bool:
    """Whether ~/.netrc holds W&B credentials (what ``wandb login`` writes)."""
    import netrc

    with contextlib.suppress(Exception):
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    return False


def wandb_id(run: Path) -> str:
    """One W&B run id per run folder, kept across resumes."""
    path = run / ".wandb_id"
    if not path.is_file():
        write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()


class MetricsLog:
    """Rank 0's per-step records: ``metrics.jsonl`` (lines of steps after a resumed checkpoint are dropped first:
    they are logged again), W&B, the progress bar and a log line every ``train.log_every`` steps. On other ranks
    every method does nothing."""

    def __init__(self, cfg: RunConfig, run: Path, total: int, done: int, resumed: bool, active: bool):
        self.active, self.total, self.log_every = active, total, cfg.train.log_every
        self.file = self.wandb = self.bar = None
        if not active:
            return
        path = run / "metrics.jsonl"
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= done]
            write_atomic(path, "".join(ln + "\n" for ln in lines))
        self.wandb = init_wandb(cfg, run, resumed)
        self.file = open(path, "a")
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)

    def record(self, record: dict) -> None:
        """Write one step's record (``step``, ``loss``, ``lr``, ``tokens_per_s``, ``peak_mem_gib``, ...)."""
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if record["step"] % self.log_every == 0:
            self.bar.write(log.line(f"step {record['step']}/{self.total} loss {record['loss']:.4f} "
                                    f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
                                    f"peak {record['peak_mem_gib']:.2f} GiB"))

    def record_eval(self, summary: dict, files: list[Path], folder: Path) -> None:
        """The in-run evaluation's summary metrics (``eval/ppl@L``, ``eval/passkey@L``, ``eval/ruler@L``, ...):
        ``<folder>/summary.json`` and the W&B run's summary (what a W&B sweep's metric reads), with the tables
        (markdown) and plots (PNG) among the tasks' ``files`` logged next to them."""
        if not self.active:
            return
        write_atomic(folder / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
        if self.wandb is None:
            return
        import wandb

        self.wandb.summary.update(summary)
        media = {f"eval/{p.parent.name}/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        media.update({f"eval/{p.parent.name}/{p.stem}_table": wandb.Html(f"<pre>{p.read_text()}</pre>")
                      for p in files if p.suffix == ".md"})
        if media:
            self.wandb.log(media)

    def close(self) -> None:
        """End the progress bar and the file (W&B stays open for the evaluation; ``finish`` ends it)."""
        if self.active and self.file is not None and not self.file.closed:
            self.bar.close()
            self.file.close()

    def finish(self) -> None:
        """Close everything, W&B included."""
        self.close()
        if self.wandb is not None:
            self.wandb.finish()
