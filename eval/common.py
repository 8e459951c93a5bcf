"""What every eval command shares: which model to evaluate, with which RoPE method, and where results go.

``--model`` is one of
- a run folder written by ``train.py`` (it holds ``merged/`` and the resolved ``config.yaml``): the fine-tuned model,
  with the method and factor it was trained with;
- a model folder (``config.json`` + safetensors), e.g. a run's ``merged/``;
- a model name understood by ``models.load`` (``smollm2-135m``, a tiny preset, a hub id).

``--rope METHOD --factor S`` applies a ``ropescale`` method to the model's config before it is built (training-free
mode); several methods, comma-separated, are evaluated one after the other, each into its own result folder.
Results go to ``<out>/<slug>/`` (``--out``, default ``runs/eval``, which git ignores: ``results/`` holds only what the
project publishes), one folder per evaluated model, so that the results of every task on one model sit side by side
for ``eval.compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, DynamicCache

from models.build import build_model, scaled_config
from models.load import load_config, load_tokenizer
from ropescale.apply import rope_of
from ropescale.methods import ROPE_METHODS
from utils.cli import UserError
from utils.files import save_figure, user_path
from utils.log import Log

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
log = Log("eval", err=True)
"""Progress goes to stderr, so that stdout's last line can be the --json result."""


class EvalError(UserError):
    """Bad eval input; the message is one line naming the problem and the fix."""


@dataclass
class EvalModel:
    """A loaded model ready to evaluate, and what it is (``info`` goes into every result file)."""

    model: torch.nn.Module
    tokenizer: object
    info: dict


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model and output options every evaluation command shares (eval.task.task_main adds the task's own)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="run folder, model folder, or model name (e.g. smollm2-135m)")
    g.add_argument("--rope", default=None,
                   help=f"training-free: RoPE method(s) to apply, comma-separated ({', '.join(ROPE_METHODS)})")
    g.add_argument("--factor", type=float, default=None, help="scale factor s for --rope")
    g.add_argument("--rope-params", default=None, help="method parameters as JSON, e.g. '{\"beta_fast\": 32}'")
    g.add_argument("--original-len", type=int, default=None, help="the model's original context (default: config)")
    g.add_argument("--rebase", action="store_true", help="allow --rope on a model that already carries a scaling")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations dtype (bfloat16 is faster on CPUs with bf16 units; logits "
                        "are upcast to fp32 either way)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default="runs/eval", help="parent folder of the result folders (default: runs/eval)")
    o.add_argument("--json", action="store_true", help="print the whole result as one JSON object on the last line")
    o.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def model_variants(args: argparse.Namespace) -> list[dict]:
    """One dict of apply_rope arguments per method in ``--rope`` (a single ``{}`` when no method is asked)."""
    if args.rope is None:
        if args.factor is not None or args.rope_params is not None:
            raise EvalError("--factor/--rope-params need --rope METHOD")
        return [{}]
    try:
        params = json.loads(args.rope_params) if args.rope_params else None
    except json.JSONDecodeError as e:
        raise EvalError(f"--rope-params is not valid JSON ({e.msg}); e.g. '{{\"beta_fast\": 32}}'") from None
    methods = [m.strip() for m in args.rope.split(",") if m.strip()]
    if not methods:
        raise EvalError("--rope needs a method name, e.g. --rope yarn --factor 2")
    out = []
    for m in methods:
        factor = args.factor
        if factor is None:
            if m != "none":
                raise EvalError(f"--rope {m} needs --factor S (the scale factor, e.g. 2)")
            factor = 1.0
        out.append(dict(method=m, factor=factor, params=params, original_len=args.original_len, rebase=args.rebase))
    return out


def locate(spec: str) -> dict:
    """Where ``--model`` points: ``{"load": what to load, "run_dir": run folder or None}``."""
    path = user_path(spec)
    if path.is_dir():
        if (path / "merged").is_dir():
            if not (path / "merged" / "config.json").is_file():
                raise EvalError(f"{path}/merged has no config.json; did the run finish exporting its merged model?")
            return {"load": str(path / "merged"), "run_dir": path}
        if (path / "config.json").is_file():
            parent = path.parent
            run_dir = parent if path.name == "merged" and (parent / "config.yaml").is_file() else None
            return {"load": str(path), "run_dir": run_dir}
        raise EvalError(f"{path} is neither a run folder (with merged/) nor a model folder (with config.json)")
    return {"load": spec, "run_dir": None}


def slug(text: str) -> str:
    """A folder-safe name: ``"tiny-llama/yarn x2"`` -> ``"tiny-llama-yarn-x2"``."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def load_eval_model(spec: str, variant: dict, dtype: str = "float32") -> EvalModel:
    """Load ``spec`` (see module docstring) with the training-free ``variant`` (``model_variants``) applied.

    ``info``: model (as given), source (run/folder/name), method, factor, fine_tuned, rope_parameters,
    original_context, dtype, label (for tables), slug (result folder name).
    """
    where = locate(spec)
    if variant:
        config = scaled_config(where["load"], variant["method"], variant["factor"], variant["params"],
                               original_len=variant["original_len"], rebase=variant["rebase"])
    else:
        config = load_config(where["load"])
    # Method and factor as the config records them (ropescale's provenance record, else rope_parameters): for a
    # run folder that is what it was trained with.
    rope = rope_of(config)
    model = build_model(where["load"], config, dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(where["load"])
    fine_tuned = where["run_dir"] is not None
    is_dir = user_path(spec).is_dir()
    base = (where["run_dir"] or user_path(spec).resolve()).name if is_dir else spec
    method, factor = rope["method"], float(rope["factor"])
    info = dict(
        model=spec,
        source="run" if fine_tuned else ("folder" if is_dir else "name"),
        method=method,
        factor=factor,
        fine_tuned=fine_tuned,
        rope_parameters=_jsonable(dict(config.rope_parameters)),
        original_context=rope["original_max_position_embeddings"],
        dtype=dtype,
        label=f"{method} x{factor:g}" + (" (fine-tuned)" if fine_tuned else ""),
        slug=slug(f"{base}-{method}-x{factor:g}" + ("-ft" if fine_tuned else "")),
    )
    return EvalModel(model=model, tokenizer=tokenizer, info=info)


def _jsonable(obj):
    """Config values as plain JSON types (tensors/tuples -> lists)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def length_axis(ax, lengths: list[int]) -> None:
    """A log2 x axis labelled with the evaluated lengths as plain numbers (4096, not 2^12)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.minorticks_off()


def draw_grid(ax, lengths: list[int], rows: list[tuple[str, object]], values: dict, fmt: str, ylabel: str,
              title: str) -> object:
    """A score heatmap in [0, 1] on a matplotlib Axes: one column per length, one row per ``(label, key)`` of
    ``rows``, each cell ``values[(length, key)]`` written with ``fmt`` (a missing cell stays blank); returns the
    image for a colorbar. Shared by the passkey and RULER-style heatmaps."""
    data = [[values.get((L, key), float("nan")) for L in lengths] for _, key in rows]
    im = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not nan
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8)
    return im


def plot_lines(entries: list[tuple[dict, dict]], values: str, ylabel: str, title: str, path: Path,
               unit_range: bool = False) -> None:
    """``result[values]`` ({length: value}) against length, one line per (model info, result) of ``entries``, into
    ``path``. ``unit_range``: a score in [0, 1] (fixed axis); otherwise a log axis when the values spread over more
    than 10x (a method that breaks down would flatten the others). Shared by the tasks' ``plot`` for eval.compare."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7 if len(entries) <= 8 else 9.5, 4.2), layout="constrained")
    ax = fig.subplots()
    # One colour per (method, factor), so a fine-tuned run (solid) and its training-free twin (dashed) pair up.
    keys = list(dict.fromkeys((m["method"], m["factor"]) for m, _ in entries))
    palette = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"].colors
    for m, result in entries:
        pts = sorted((int(k), v) for k, v in result[values].items() if v is not None and math.isfinite(v))
        color = palette[keys.index((m["method"], m["factor"])) % len(palette)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if m["fine_tuned"] else "--",
                color=color, label=m["label"])
    originals = sorted({m["original_context"] for m, _ in entries if m["original_context"]})
    for i, L in enumerate(originals):
        ax.axvline(L, color="grey", linestyle=":", label="original context" if i == 0 else None)
    length_axis(ax, sorted({int(k) for _, result in entries for k in result[values]}))
    found = [v for _, result in entries for v in result[values].values() if v is not None]
    if unit_range:
        ax.set_ylim(-0.03, 1.03)
    elif found and max(found) > 10 * min(found):
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (dashed: training-free)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if len(entries) <= 8:
        ax.legend(fontsize=8)
    else:  # outside the axes, where it hides no line
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def grid_figure(lengths: list[int], rows: int):
    """A matplotlib Figure sized for one ``draw_grid`` heatmap of ``rows`` rows and a colorbar."""
    from matplotlib.figure import Figure

    return Figure(figsize=(2.4 + 0.9 * len(lengths), 1.4 + 0.35 * rows), layout="constrained")


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


@torch.inference_mode()
def greedy_decode(model, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                  cache: Cache | None = None, prefill_chunk: int = 1024) -> list[int]:
    """Greedy continuation of ``ids``: one prefill forward (last position's logits only), then cached steps.

    ``cache``: a KV cache that already holds ``ids[:cache.get_seq_length()]`` (a prefix shared with an earlier
    prompt, see ``SharedPrefix``); only the rest is prefilled, ``prefill_chunk`` tokens per forward, and the cache is
    extended in place. Why chunks: without a cache attention runs causal (the kernel skips the masked half); after a
    cached prefix transformers passes an explicit mask and the CPU kernel then computes every query-key pair, twice
    the work for a long rest; in chunks only the last block of each chunk is masked (measured in docs/eval.md).
    """
    device = next(model.parameters()).device
    start = 0 if cache is None else cache.get_seq_length()
    step = len(ids) if start == 0 else prefill_chunk
    for a in range(start, len(ids), step):
        out = model(input_ids=torch.tensor([ids[a:a + step]], device=device), cache=cache, use_cache=True,
                    logits_to_keep=1)
        cache = out.cache
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        if nxt == eos_token_id or len(tokens) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), cache=out.cache, use_cache=True)
    return tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def shared_prefix_for(wanted: bool, info: dict) -> bool:
    """Whether ``SharedPrefix`` reuses prefixes for this model: if ``wanted`` (the task's ``shared_prefix``
    setting), unless its RoPE method's table depends on the sequence length (then the reuse would not be exact; said
    on stderr)."""
    if wanted and ROPE_METHODS[info["method"]].length_dependent:
        log(f"{info['method']}: its RoPE table depends on the sequence length, so every prompt is prefilled in full "
            "(no shared-prefix reuse)")
        return False
    return wanted


class SharedPrefix:
    """Greedy decoding of prompts one after another, each reusing the KV cache of the tokens it shares with the
    previous prompt (in a depth sweep over one haystack: everything before the earlier needle), so that only the
    rest is prefilled.

    Exact for RoPE tables that do not depend on the sequence length: a cached key depends only on its token, its
    position and the tokens before it, which the shared prefix fixes. Methods whose table does (``length_dependent``
    in ``ropescale.methods``: dynamic NTK, dynamic YaRN, LongRoPE) pass ``enabled=False``, and every prompt is then
    prefilled in full. The prefix is found on token ids, not text, so it holds for any tokenizer. A prefix shorter
    than ``min_share`` of the prompt is not reused: the rest, prefilled after a cache, costs more per token than
    one causal prefill (``greedy_decode``), and below about a third of an 8k prompt the reuse loses time on a CPU
    (measured in docs/eval.md). ``reused`` / ``prefilled``: prompt tokens taken from the cache / run through the
    model, over all prompts.
    """

    def __init__(self, model, enabled: bool = True, min_share: float = 1 / 3, prefill_chunk: int = 1024):
        self.model, self.enabled, self.min_share, self.prefill_chunk = model, enabled, min_share, prefill_chunk
        self.ids: list[int] = []
        self.cache: Cache | None = None
        self.reused = self.prefilled = 0

    def decode(self, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        # at least the last prompt token is run: its logits give the first answer token
        keep = min(common_prefix(self.ids, ids), len(ids) - 1) if self.enabled and self.cache is not None else 0
        if keep < self.min_share * len(ids) or keep == 0:
            keep, self.cache = 0, None
        else:  # drop the previous prompt's tail and answer (transformers' crop takes minus the tokens to remove)
            self.cache.crop(keep - self.cache.get_seq_length())
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        out = greedy_decode(self.model, ids, max_new_tokens, eos_token_id, cache=self.cache,
                            prefill_chunk=self.prefill_chunk)
        self.ids = ids
        self.reused += keep
        self.prefilled += len(ids) - keep
        return out


def each_model(args: argparse.Namespace) -> Iterator[EvalModel]:
    """The model of ``--model``, loaded once per ``--rope`` variant, one after the other."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for variant in model_variants(args):
        yield load_eval_model(args.model, variant, args.dtype)


def emit(results: list[dict], args: argparse.Namespace) -> dict:
    """The command's result: the one model's result dict, or ``{"results": [...]}`` for several ``--rope`` methods;
    printed as one JSON line with ``--json``."""
    result = results[0] if len(results) == 1 else {"results": results}
    if args.json:
        print(json.dumps(result, allow_nan=False), flush=True)
    return result
