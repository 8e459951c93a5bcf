"""Passkey retrieval: can the model repeat a 5-digit number hidden at a given depth of a long, boring prompt?

The prompt is the standard one of the PI, YaRN and LongLoRA evaluations (after Mohtashami & Jaggi's landmark
attention paper): a task statement, the filler sentence group repeated, the key line at the asked depth, more
filler, then the question. The filler is repeated as often as fits in ``length - max_new_tokens`` tokens, so prompt
and answer together stay within ``length``. Depth d puts round(d * n) of the n filler groups before the key line.

Decoding is greedy: one forward over the whole prompt (the prefill), then ``max_new_tokens`` single-token steps with
the KV cache; the first run of digits in the answer must equal the key exactly. Keys are drawn from a seeded RNG
per (seed, length, depth, trial), so one seed gives byte-identical prompts on every machine and run.

    python -m eval.passkey --model smollm2-135m --lengths 4096,8192 --depths 0,0.25,0.5,0.75,1 --trials 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from data.prompts import FILLER, KEY_LINE, PROMPT_VERSION, QUESTION, TASK, prompt_text
from eval.common import EvalError, EvalModel, SharedPrefix, Timer, draw_grid, grid_figure, log, shared_prefix_for
from eval.task import EvalTask, task_main
from utils.cli import exit_process, run_cli
from utils.files import save_figure, write_atomic, write_json
from utils.schema import Depth, Length, StrictModel

DEFINITION = (
    "passkey: prompt = task statement, filler (repeated to fill length - max_new_tokens tokens), key line at "
    "depth d (round(d*n) of n filler groups before it), question; greedy decoding of max_new_tokens tokens after "
    "one prefill; correct iff the first run of digits in the answer equals the 5-digit key"
)


class PasskeySettings(StrictModel):
    """The ``eval.passkey`` section and ``python -m eval.passkey``'s options."""

    lengths: list[Length] = Field(default=[4096, 8192, 16384], min_length=1)
    """Prompt lengths in tokens (prompt and answer together)."""
    depths: list[Depth] = Field(default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=1)
    """Key depths in [0, 1]."""
    trials: int = Field(default=2, ge=1, le=10**4)
    """Prompts (different keys) per (length, depth)."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed of the keys."""
    max_new_tokens: int = Field(default=10, ge=1, le=4096)
    """Greedy answer tokens."""
    shared_prefix: bool = True
    """Reuse the KV cache of the prefix a prompt shares with the previous one (the answers are the same up to
    rounding; off: every prompt prefilled in full, slower)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    key: str
    n_filler: int  # filler groups in the prompt
    n_before: int  # filler groups before the key line
    key_position: int  # token index where the key line starts


def pass_key(seed: int, length: int, depth: float, trial: int) -> str:
    """The 5-digit key of one cell and trial; a string seed hashes the same way on every platform (sha512)."""
    return str(random.Random(f"passkey/{seed}/{length}/{depth:.6f}/{trial}").randint(10000, 99999))


def build_prompt(tokenizer, length: int, depth: float, key: str, max_new_tokens: int) -> Prompt:
    """The longest prompt of at most ``length - max_new_tokens`` tokens with the key at ``depth`` (0 to 1)."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"depth must be between 0 and 1, got {depth}")
    budget = length - max_new_tokens

    def make(n: int) -> tuple[str, list[int], int]:
        before = round(depth * n)
        text = prompt_text(key, before, n - before)
        return text, tokenizer(text).input_ids, before

    if len(make(1)[1]) > budget:
        raise EvalError(
            f"length {length} is too short for a passkey prompt with {max_new_tokens} answer tokens "
            f"(needs at least {len(make(1)[1]) + max_new_tokens}); use a longer --lengths"
        )
    # Token count is affine in n up to merges at the joins: estimate, then step to the exact largest n that fits.
    base = len(make(0)[1])
    per = (len(make(100)[1]) - base) / 100
    n = max(1, int((budget - base) / per))
    while n > 1 and len(make(n)[1]) > budget:
        n -= 1
    while len(make(n + 1)[1]) <= budget:
        n += 1
    text, ids, before = make(n)
    key_char = text.index(KEY_LINE.format(key=key))
    key_position = len(tokenizer(text[:key_char]).input_ids)
    return Prompt(text=text, ids=ids, key=key, n_filler=n, n_before=before, key_position=key_position)


def parse_number(answer: str) -> str | None:
    """The first run of digits in the model's answer, or None."""
    m = re.search(r"\d+", answer)
    return m.group(0) if m else None


def evaluate_passkey(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    max_new_tokens: int = 10,
    shared_prefix: bool = True,
) -> dict:
    """Greedy passkey retrieval for every (length, depth), ``trials`` prompts each.

    Returns ``cells`` (length, depth, accuracy, and per trial: key, answer, correct, prompt_tokens, key_position,
    seconds), ``prompt_tokens``, ``seconds``, ``tokens_per_s`` (prompt tokens per second of decoding time) and
    ``reused_tokens`` (prompt tokens taken from the shared-prefix cache). Lengths run in ascending order:
    transformers' dynamic RoPE keeps the largest table it has seen. The trials of one cell differ only from the key
    line on (the filler is fixed), so with ``shared_prefix`` (``eval.common.SharedPrefix``) each trial after the
    first prefills only the key line and what follows it.
    """
    if trials < 1:
        raise EvalError(f"--trials must be >= 1, got {trials}")
    cells = []
    tokens = seconds = 0.0
    decoder = SharedPrefix(model, enabled=shared_prefix)
    for length in sorted(lengths):
        for depth in depths:
            runs = []
            for trial in range(trials):
                p = build_prompt(tokenizer, length, depth, pass_key(seed, length, depth, trial), max_new_tokens)
                with Timer() as t:
                    out = decoder.decode(p.ids, max_new_tokens, tokenizer.eos_token_id)
                answer = tokenizer.decode(out, skip_special_tokens=True)
                correct = parse_number(answer) == p.key
                tokens += len(p.ids)
                seconds += t.seconds
                runs.append(dict(trial=trial, key=p.key, answer=answer, correct=correct, prompt_tokens=len(p.ids),
                                 key_position=p.key_position, seconds=round(t.seconds, 3)))
                log(f"passkey length {length} depth {depth:g} trial {trial}: key {p.key} answer {answer!r} "
                    f"{'ok' if correct else 'WRONG'} ({len(p.ids)} tokens, {t.seconds:.1f} s)")
            cells.append(dict(length=length, depth=depth, accuracy=sum(r["correct"] for r in runs) / trials,
                              trials=runs))
    return dict(cells=cells, prompt_tokens=int(tokens), seconds=round(seconds, 3),
                tokens_per_s=round(tokens / seconds, 1) if seconds else None, reused_tokens=decoder.reused)


def summarize(model_info: dict, settings: dict, cells: list[dict], prompt_tokens: int, seconds: float) -> dict:
    """The full result: overall ``accuracy``, per-length accuracy, every cell and trial."""
    n = sum(len(c["trials"]) for c in cells)
    by_length: dict[str, list[bool]] = {}
    for c in cells:
        by_length.setdefault(str(c["length"]), []).extend(r["correct"] for r in c["trials"])
    return dict(
        kind="passkey",
        version=PROMPT_VERSION,
        model=model_info,
        settings=settings,
        definition=DEFINITION,
        accuracy=sum(sum(v) for v in by_length.values()) / n,
        by_length={k: sum(v) / len(v) for k, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))},
        cells=sorted(cells, key=lambda c: (c["length"], c["depth"])),
        prompt_tokens=prompt_tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(prompt_tokens / seconds, 1) if seconds else None,
    )


def _grid(result: dict) -> tuple[list[int], list[float], dict]:
    lengths = sorted({c["length"] for c in result["cells"]})
    depths = sorted({c["depth"] for c in result["cells"]})
    return lengths, depths, {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}


def passkey_markdown(result: dict) -> str:
    """Accuracy table, depths x lengths, with the settings and definition."""
    lengths, depths, acc = _grid(result)
    m, s = result["model"], result["settings"]
    lines = [
        f"# Passkey retrieval: {m['label']}",
        "",
        f"Model `{m['model']}`, method {m['method']} x{m['factor']:g}, dtype {m['dtype']}; seed {s['seed']}, "
        f"{s['trials']} trial(s) per cell, {s['max_new_tokens']} answer tokens. Overall accuracy "
        f"**{result['accuracy']:.0%}**; {result['prompt_tokens']} prompt tokens in {result['seconds']:.0f} s "
        f"({result['tokens_per_s']} tokens/s).",
        "",
        "| depth | " + " | ".join(str(L) for L in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for d in depths:
        row = [f"{acc[(L, d)]:.0%}" if (L, d) in acc else "" for L in lengths]
        lines.append(f"| {d:g} | " + " | ".join(row) + " |")
    lines.append("| **all** | " + " | ".join(f"**{result['by_length'][str(L)]:.0%}**" for L in lengths) + " |")
    lines += ["", f"Definition: {result['definition']}.", ""]
    return "\n".join(lines)


def draw_heatmap(ax, result: dict, title: str | None = None) -> object:
    """Accuracy heatmap (depth down, length across) on a matplotlib Axes; returns the image for a colorbar."""
    lengths, depths, acc = _grid(result)
    return draw_grid(ax, lengths, [(f"{d:g}", d) for d in depths], acc, ".0%", "key depth",
                     title or result["model"]["label"])


def write_passkey(result: dict, folder: Path) -> None:
    """passkey.json, passkey.md and passkey.png in ``folder`` (each written atomically)."""
    lengths, depths, _ = _grid(result)
    fig = grid_figure(lengths, len(depths))
    ax = fig.subplots()
    fig.colorbar(draw_heatmap(ax, result, f"passkey: {result['model']['label']}"), ax=ax, label="accuracy")
    save_figure(fig, folder / "passkey.png")
    write_atomic(folder / "passkey.md", passkey_markdown(result))
    write_json(folder / "passkey.json", result)


def _merge_previous(path: Path, result: dict) -> dict:
    """``--append``: keep the cells of an earlier run of the same model and settings that this run did not redo."""
    if not path.is_file():
        return result
    old = json.loads(path.read_text())
    if old.get("version") != result["version"] or old.get("model") != result["model"] or any(
        old["settings"].get(k) != result["settings"][k] for k in ("seed", "max_new_tokens")
    ):
        raise EvalError(f"--append: {path} holds results of another model, seed or prompt version; "
                        "use another --out or drop --append")
    redone = {(c["length"], c["depth"]) for c in result["cells"]}
    kept = [c for c in old["cells"] if (c["length"], c["depth"]) not in redone]
    settings = dict(result["settings"], lengths=sorted({c["length"] for c in kept + result["cells"]}),
                    depths=sorted({c["depth"] for c in kept + result["cells"]}))
    return summarize(result["model"], settings, kept + result["cells"], old["prompt_tokens"] + result["prompt_tokens"],
                     old["seconds"] + result["seconds"])


def run(em: EvalModel, s: PasskeySettings) -> dict:
    """``EvalTask.run``: passkey retrieval of a loaded model with settings ``s``."""
    share = shared_prefix_for(s.shared_prefix, em.info)
    settings = dict(lengths=s.lengths, depths=s.depths, trials=s.trials, seed=s.seed,
                    max_new_tokens=s.max_new_tokens, shared_prefix=share,
                    prompt=dict(task=TASK, filler=FILLER, key_line=KEY_LINE, question=QUESTION))
    log(f"passkey: {em.info['label']} ({em.info['model']})")
    with torch.inference_mode():
        raw = evaluate_passkey(em.model, em.tokenizer, s.lengths, s.depths, s.trials, s.seed, s.max_new_tokens, share)
    return summarize(em.info, settings, raw["cells"], raw["prompt_tokens"], raw["seconds"])


def plot(entries: list[tuple[dict, dict]], path: Path) -> None:
    """``eval.compare``'s picture: the passkey heatmaps side by side (one per run, shared colour scale)."""
    from matplotlib.figure import Figure

    cols = min(4, len(entries))
    nrows = -(-len(entries) // cols)
    fig = Figure(figsize=(3.2 * cols + 0.8, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    im = None
    for i, (ax, (model, result)) in enumerate(zip(axes.flat, entries)):
        im = draw_heatmap(ax, result, f"{model['label']}\nacc {result['accuracy']:.0%}")
        if i % cols:
            ax.set_ylabel("")
    for ax in list(axes.flat)[len(entries):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes.ravel().tolist(), label="passkey accuracy")
    save_figure(fig, path)


def check(s: PasskeySettings, tokenizer) -> None:
    """``EvalTask.check``: the shortest length holds a prompt and its answer under ``tokenizer``."""
    build_prompt(tokenizer, min(s.lengths), s.depths[0], pass_key(s.seed, min(s.lengths), s.depths[0], 0),
                 s.max_new_tokens)


EVAL_TASK = EvalTask(
    name="passkey",
    module="eval.passkey",  # not __name__: that is "__main__" under `python -m`
    description="Passkey retrieval: a 5-digit key at a depth of a long prompt, greedy answer (eval/passkey.py).",
    settings=PasskeySettings,
    run=run,
    write=write_passkey,
    summary=lambda result: {**{f"passkey@{n}": v for n, v in result["by_length"].items()},
                            "passkey_all": result["accuracy"]},
    metrics=lambda s: [f"passkey@{n}" for n in sorted(set(s.lengths))] + ["passkey_all"],
    goal="maximize",
    objective=lambda s: f"passkey@{max(s.lengths)}",
    files=("passkey.json", "passkey.md", "passkey.png"),
    formats=(("passkey", ".0%"),),
    plot=plot,
    check=check,
    renamed={"passkey_lengths": "lengths", "passkey_depths": "depths", "passkey_trials": "trials"},
)


def add_append(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing passkey.json of the same model and seed (e.g. fewer depths at 16k)")


def main(argv: list[str] | None = None) -> dict:
    return task_main(EVAL_TASK, argv, __doc__, extra=add_append,
                     finish=lambda args, folder, result: (_merge_previous(folder / "passkey.json", result)
                                                          if args.append else result))


if __name__ == "__main__":
    exit_process(run_cli(main))
