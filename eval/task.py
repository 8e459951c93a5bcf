"""What an evaluation task is, and the command every task shares.

A task is one module of ``eval/`` that defines ``EVAL_TASK``, an ``EvalTask`` record, and is listed once in
``eval/registry.py``. Everything that evaluates reads the record, never the module's internals:

- the run config's ``eval.<name>`` section is the task's ``settings`` model (configs/schema.py builds the ``eval:``
  section from the registry);
- the in-run evaluation (training/evaluate.py) calls ``run`` on the merged model it loaded once, then ``write``;
- sweeps (launch/sweep.py) launch ``python -m <module>`` with ``settings_argv(settings)`` for training-free points,
  call a run finished when every configured task wrote its ``result_file``, and take a W&B objective among
  ``metrics(settings)`` (``goal`` says which way is better);
- ``eval.compare`` makes table columns of ``summary(result)`` (plus ``describe(result)``), formats them with
  ``formats`` and draws ``plot`` once per task.

The command line of every task (``python -m eval.passkey ...``) is built here from the settings model: one option
per field (``max_new_tokens`` -> ``--max-new-tokens``; lists of numbers or names comma-separated, lists of free text
space-separated, a boolean that is on by default turned off with ``--no-<name>``), so that a config section and a
command line take the same names, bounds and defaults, and ``settings_argv`` writes any settings back as options.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from eval.common import EvalError, EvalModel, add_model_args, each_model, emit, log
from utils.schema import StrictModel

Settings = Any  # an instance of the task's settings model


def no_description(result: dict) -> dict[str, str | None]:
    """The default ``describe``: no descriptive column."""
    return {}


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task, as every caller sees it."""

    name: str
    """The config section ``eval.<name>``, the result file ``<name>.json``, the table's task."""
    module: str
    """The task's module, run as ``python -m <module>`` (it calls ``task_main``)."""
    description: str
    """One line: what the task measures (the ``eval.<name>`` field's documentation)."""
    settings: type[StrictModel]
    """Its settings: the config section and the command's options."""
    run: Callable[[EvalModel, Settings], dict]
    """Evaluate a loaded model: the whole result, JSON-ready, with ``kind`` = name, ``model`` = the model's info,
    ``settings`` and ``definition``."""
    write: Callable[[dict, Path], None]
    """Write a result's files into a folder (the result file first among ``files``)."""
    summary: Callable[[dict], dict[str, float | int | None]]
    """The summary metrics of a result (``ppl@4096``, ``passkey_all``, ...): logged as ``eval/<metric>`` to W&B and
    ``summary.json``, and the task's columns in ``eval.compare``."""
    metrics: Callable[[Settings], list[str]]
    """The metric names ``summary`` gives for results of these settings (known before the run: a sweep's objective is
    checked against them)."""
    goal: Literal["minimize", "maximize"]
    """Which way the task's metrics are better."""
    files: tuple[str, ...]
    """The files ``write`` makes, as glob patterns in the model's result folder (the result file first)."""
    objective: Callable[[Settings], str] | None = None
    """The metric a W&B sweep optimizes by default when this is the first task of the runs' config (None: none)."""
    formats: tuple[tuple[str, str], ...] = ()
    """(metric name prefix, format spec) pairs for tables, e.g. ``("ppl@", ".3f")``."""
    describe: Callable[[dict], dict[str, str | None]] = no_description
    """Descriptive columns of a result for ``eval.compare`` (e.g. the perplexity definition), before its metrics."""
    plot: Callable[[list[tuple[dict, dict]], Path], None] | None = None
    """``eval.compare``'s picture of the task: (model info, result) of every run that has it -> ``<name>.png``."""
    check: Callable[[Settings, Any], None] | None = None
    """What a run can refuse before it trains: ``check(settings, tokenizer)`` raises EvalError when a prompt of these
    settings cannot be built with this tokenizer (too short a length for the prompt and its answer; no chat
    template). training/preflight.py calls it."""
    renamed: Mapping[str, str] = field(default_factory=dict)
    """Flat ``eval:`` keys of older configs -> the field that replaced them (``passkey_lengths`` -> ``lengths``), so
    that an old config is refused with the new name."""

    @property
    def result_file(self) -> str:
        return f"{self.name}.json"


# ---------------------------------------------------------------------------------- settings <-> command line


def _bare(annotation):
    """The annotation without ``| None`` and ``Annotated[...]``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _kind(annotation) -> str:
    """``flag`` (bool), ``words`` (a list of free text), ``list`` (numbers or names, comma-separated) or ``value``."""
    annotation = _bare(annotation)
    if annotation is bool:
        return "flag"
    if typing.get_origin(annotation) is list:
        return "words" if typing.get_args(annotation)[0] is str else "list"
    return "value"


def option(name: str) -> str:
    """A settings field's command-line option: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def add_settings_args(parser: argparse.ArgumentParser, settings: type[StrictModel]) -> None:
    """One option per field of ``settings``; an option left out keeps the field's default."""
    g = parser.add_argument_group("task settings (the run config's eval section takes the same names)")
    for name, f in settings.model_fields.items():
        kind, doc = _kind(f.annotation), (f.description or "").rstrip(".")
        default = f.get_default(call_default_factory=True)
        if kind == "flag":
            flag = f"--no-{name.replace('_', '-')}" if default else option(name)
            g.add_argument(flag, dest=name, action="store_false" if default else "store_true",
                           default=argparse.SUPPRESS, help=("turns this off: " if default else "") + doc)
            continue
        choices = typing.get_args(_bare(f.annotation)) if typing.get_origin(_bare(f.annotation)) is Literal else None
        shown = {"list": lambda: "comma-separated; default: " + ",".join(map(str, default)),
                 "words": lambda: "space-separated; default: " + " ".join(default)}.get(kind, lambda: (
                     "" if default is None else f"default: {default}"))()
        g.add_argument(option(name), dest=name, nargs="+" if kind == "words" else None, default=argparse.SUPPRESS,
                       choices=choices, help=doc + (f" ({shown})" if shown else ""))


def settings_from_args(settings: type[StrictModel], args: argparse.Namespace):
    """The settings of the options given (the others at their defaults); EvalError names the option at fault."""
    values = {}
    for name, f in settings.model_fields.items():
        if hasattr(args, name):
            value = getattr(args, name)
            values[name] = [v.strip() for v in value.split(",") if v.strip()] if _kind(f.annotation) == "list" \
                else value
    try:
        return settings.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:  # a field's own check: name the option and the value given
            name = str(err["loc"][0])
            raise EvalError(f"{option(name)}: {msg} (got {getattr(args, name)!r})") from None
        raise EvalError(msg) from None


def settings_argv(settings_value) -> list[str]:
    """The options that give ``settings_value`` back (fields at their default are left out)."""
    argv: list[str] = []
    for name, f in type(settings_value).model_fields.items():
        value, default = getattr(settings_value, name), f.get_default(call_default_factory=True)
        if value == default:
            continue
        kind = _kind(f.annotation)
        if value is None:
            raise EvalError(f"{name}: None cannot be given on a command line (its default is {default})")
        if kind == "flag":
            argv.append(option(name) if value else f"--no-{name.replace('_', '-')}")
        elif kind == "words":
            argv += [option(name), *value]
        elif kind == "list":
            argv += [option(name), ",".join(map(str, value))]
        else:
            argv += [option(name), str(value)]
    return argv


# ------------------------------------------------------------------------------------------------- the command


def task_main(task: EvalTask, argv: list[str] | None = None, doc: str | None = None,
              extra: Callable[[argparse.ArgumentParser], None] | None = None,
              finish: Callable[[argparse.Namespace, Path, dict], dict] | None = None) -> dict:
    """``python -m <task.module>``: the model options (eval.common), the task's settings as options, then ``run``
    and ``write`` for each model variant into ``<--out>/<model slug>/``. ``doc``: the help text (the module's
    docstring); ``extra`` adds options of the command alone; ``finish(args, folder, result)`` may change a result
    before it is written (passkey's ``--append``)."""
    ap = argparse.ArgumentParser(prog=f"python -m {task.module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_settings_args(ap, task.settings)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    settings = settings_from_args(task.settings, args)
    results = []
    for em in each_model(args):
        result = task.run(em, settings)
        folder = Path(args.out) / em.info["slug"]
        if finish is not None:
            result = finish(args, folder, result)
        task.write(result, folder)
        log(f"{task.name}: {em.info['label']}: {task.summary(result)} -> {folder / task.result_file}")
        results.append(result)
    return emit(results, args)
