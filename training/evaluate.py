"""The in-run evaluation: the eval commands on the merged model, when the run config has an ``eval:`` section."""

from __future__ import annotations

from pathlib import Path

from configs.schema import RunConfig
from eval import passkey, perplexity


def evaluate_run(cfg: RunConfig, run: Path) -> None:
    """Run perplexity and passkey on ``run``'s merged model; results go to ``<run>/eval/`` where eval.compare and
    sweeps read them. The held-out split of the bundled corpus is the default text (training never reads it)."""
    e, common = cfg.eval, ["--model", str(run), "--out", str(run / "eval")]
    if e.perplexity_lengths:
        argv = common + ["--lengths", ",".join(map(str, e.perplexity_lengths)), "--mode", e.perplexity_mode]
        perplexity.main(argv + (["--stride", str(e.stride)] if e.stride else []))
    if e.passkey_lengths:
        passkey.main(common + ["--lengths", ",".join(map(str, e.passkey_lengths)),
                               "--depths", ",".join(map(str, e.passkey_depths)), "--trials", str(e.passkey_trials)])
