"""The in-run evaluation: the eval commands on the merged model, when the run config has an ``eval:`` section."""

from __future__ import annotations

from pathlib import Path

from configs.schema import RunConfig
from eval import passkey, perplexity, ruler


def evaluate_run(cfg: RunConfig, run: Path) -> dict[str, float | int | None]:
    """Run perplexity, passkey and the RULER-style suite on ``run``'s merged model; results go to ``<run>/eval/``
    where eval.compare and sweeps read them. The held-out split of the bundled corpus is the default text (training
    never reads it). Returns the summary metrics of the run: ``eval/ppl@L``, ``eval/passkey@L``, ``eval/ruler@L``
    per length and ``eval/ruler_effective``, for W&B and ``<run>/eval/summary.json``."""
    e, common = cfg.eval, ["--model", str(run), "--out", str(run / "eval")]
    summary: dict[str, float | int | None] = {}
    if e.perplexity_lengths:
        argv = common + ["--lengths", ",".join(map(str, e.perplexity_lengths)), "--mode", e.perplexity_mode]
        result = perplexity.main(argv + (["--stride", str(e.stride)] if e.stride else []))
        summary.update({f"eval/ppl@{n}": v for n, v in result["ppl"].items()})
    if e.passkey_lengths:
        result = passkey.main(common + ["--lengths", ",".join(map(str, e.passkey_lengths)),
                                        "--depths", ",".join(map(str, e.passkey_depths)),
                                        "--trials", str(e.passkey_trials)])
        summary.update({f"eval/passkey@{n}": v for n, v in result["by_length"].items()})
    if e.ruler_lengths:
        result = ruler.main(common + ["--lengths", ",".join(map(str, e.ruler_lengths)), "--tasks",
                                      ",".join(e.ruler_tasks), "--depths", ",".join(map(str, e.ruler_depths)),
                                      "--samples", str(e.ruler_samples)])
        summary.update({f"eval/ruler@{n}": v for n, v in result["by_length"].items()})
        summary["eval/ruler_effective"] = result["effective_length"]
    return summary
