"""The in-run evaluation: the eval commands on the merged model, when the run config has an ``eval:`` section."""

from __future__ import annotations

from pathlib import Path

from configs.schema import EvalSection, RunConfig
from eval import passkey, perplexity, ruler


def eval_arguments(e: EvalSection) -> dict[str, list[str]]:
    """The arguments (besides the model and ``--out``) of each eval command an ``eval:`` section asks for, by
    module name (``perplexity``, ``passkey``, ``ruler``); a command without lengths is left out. The in-run
    evaluation and training-free sweeps (launch/sweep.py) both run these."""
    def joined(values) -> str:
        return ",".join(map(str, values))

    args = {}
    if e.perplexity_lengths:
        args["perplexity"] = ["--lengths", joined(e.perplexity_lengths), "--mode", e.perplexity_mode] + (
            ["--stride", str(e.stride)] if e.stride else [])
    if e.passkey_lengths:
        args["passkey"] = ["--lengths", joined(e.passkey_lengths), "--depths", joined(e.passkey_depths),
                           "--trials", str(e.passkey_trials)]
    if e.ruler_lengths:
        args["ruler"] = ["--lengths", joined(e.ruler_lengths), "--tasks", joined(e.ruler_tasks),
                         "--depths", joined(e.ruler_depths), "--samples", str(e.ruler_samples)]
    return args


def evaluate_run(cfg: RunConfig, run: Path) -> dict[str, float | int | None]:
    """Run perplexity, passkey and the RULER-style suite on ``run``'s merged model; results go to ``<run>/eval/``
    where eval.compare and sweeps read them. The held-out split of the bundled corpus is the default text (training
    never reads it). Returns the summary metrics of the run: ``eval/ppl@L``, ``eval/passkey@L``, ``eval/ruler@L``
    per length and ``eval/ruler_effective``, for W&B and ``<run>/eval/summary.json``."""
    common = ["--model", str(run), "--out", str(run / "eval")]
    summary: dict[str, float | int | None] = {}
    for name, args in eval_arguments(cfg.eval).items():
        result = {"perplexity": perplexity, "passkey": passkey, "ruler": ruler}[name].main(common + args)
        if name == "perplexity":
            summary.update({f"eval/ppl@{n}": v for n, v in result["ppl"].items()})
        elif name == "passkey":
            summary.update({f"eval/passkey@{n}": v for n, v in result["by_length"].items()})
        else:
            summary.update({f"eval/ruler@{n}": v for n, v in result["by_length"].items()})
            summary["eval/ruler_effective"] = result["effective_length"]
    return summary
