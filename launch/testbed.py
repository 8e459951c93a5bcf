"""Build the testbed base: tokenizer -> pretraining with train.py -> ``runs/testbed/model``; ``--install`` commits it.

    python -m launch.testbed [--nproc 2] [--force] [--install] [--set train.max_steps=100 ...]

The testbed is a small Llama pretrained from scratch at a native context of 1,024 tokens (configs/testbed/base.yaml),
so that the whole context-extension experiment (extend 4x-8x, fine-tune, evaluate, compare) runs on a CPU in minutes.
The base the demo and the extension configs use is the committed one, ``models/testbed`` (safetensors, tokenizer,
config and ``manifest.json``: the recipe, the build command and the sha256 of every file); this module rebuilds it
(``make testbed``) and, with ``--install``, replaces the committed copy. The build has two steps, each skipped when
its key file matches:

1. the tokenizer (``model.tokenizer``): a 4k byte-level BPE with single-digit tokens trained on the bundled corpus's
   train split (data/tokenizer_train.py); key: vocabulary size, the corpus manifest, the trainer's source;
2. the pretraining: an ordinary ``train.py`` run, launched as ``deepspeed --num_gpus N train.py --config
   configs/testbed/base.yaml`` with ``OMP_NUM_THREADS=1``; its merged model is copied to ``runs/testbed/model`` and
   ``testbed_key.json`` is written into it last. Key: base.yaml's YAML content and the ``--set`` overrides, the
   tokenizer's sha256, and the data behind each source (corpus sha256s, the synthetic generators' fingerprints).
   Code changes (train.py, transformers) do not rebuild the base: ``--force`` does.

A rebuild reproduces the committed base's recipe exactly (config, tokenizer, data, key: tests/test_testbed.py checks
it without training), not its weights: float sums differ across CPUs and process counts. After a build the command
says whether its recipe is the committed one. A build that stops half-way leaves no key file, so the next call builds
again, resuming from the run folder's last checkpoint when it was started for the same key (``--resume auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from configs.schema import RunConfig, load_run_config
from models.build import apply_arch
from models.load import load_config, load_tokenizer
from training.runtime import machine
from utils.cli import UserError, exit_process, free_port, run_cli
from utils.files import atomic_dir, file_sha256, json_digest, write_json
from utils.log import Log

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = Path("configs/testbed/base.yaml")  # relative to ROOT; run and model folders are relative to the cwd
MODEL_DIR = Path("runs/testbed/model")  # what a build writes (relative to the cwd)
COMMITTED_DIR = ROOT / "models" / "testbed"  # the base in the repository, loaded by the extension configs and the demo
MANIFEST = "manifest.json"
KEY_FILE = "testbed_key.json"
RUN_KEY_FILE = "testbed_run_key.json"


class TestbedError(UserError):
    """A testbed that cannot be built; one line naming the problem and the fix."""


log = Log("testbed")


def _read_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_base(overrides: list[str] = ()) -> RunConfig:
    """The base config with ``overrides`` applied; it must pretrain from scratch with its own tokenizer."""
    cfg = load_run_config(ROOT / BASE_CONFIG, overrides)
    if cfg.model.init != "scratch" or not cfg.model.tokenizer or "vocab_size" not in cfg.model.arch:
        raise TestbedError(f"{BASE_CONFIG}: the testbed base trains from scratch (model.init: scratch) with its own "
                           "tokenizer (model.tokenizer) of model.arch.vocab_size tokens")
    return cfg


# ------------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_key(cfg: RunConfig) -> str:
    """What the tokenizer is a function of: its vocabulary size, the corpus it is trained on, the trainer's code."""
    from data.corpus import manifest

    corpus = [e["sha256"] for e in manifest() if e["split"] == "train"]
    return json_digest({"vocab_size": cfg.model.arch.get("vocab_size"), "corpus": corpus,
                    "trainer": file_sha256(ROOT / "data" / "tokenizer_train.py")})


def ensure_tokenizer(cfg: RunConfig) -> Path:
    """Train the tokenizer into ``cfg.model.tokenizer`` unless its key matches; check it against ``model.arch``."""
    from data.tokenizer_train import build_tokenizer

    path, arch = Path(cfg.model.tokenizer), cfg.model.arch
    key = tokenizer_key(cfg)
    if _read_key(path / KEY_FILE) == key:
        log(f"tokenizer: reusing {path} (same corpus and settings)")
    else:
        log(f"tokenizer: training a {arch['vocab_size']}-token byte-level BPE on the bundled train split -> {path}")
        build_tokenizer(path, arch["vocab_size"])
        write_json(path / KEY_FILE, {"key": key}, sort_keys=True)
    # models.load.load_tokenizer (which train.py and eval use) opens folders that hold a config.json: the
    # architecture this tokenizer is made for goes beside it (rewritten each time: model.arch may have changed).
    apply_arch(load_config(cfg.model.name), dict(cfg.model.arch)).save_pretrained(path)
    tok = load_tokenizer(str(path))
    want = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    wrong = {k: (arch.get(k), v) for k, v in want.items() if arch.get(k) != v}
    if wrong:
        detail = ", ".join(f"model.arch.{k} is {a} but the tokenizer has {v}" for k, (a, v) in wrong.items())
        raise TestbedError(f"{BASE_CONFIG}: {detail}; make model.arch agree with the tokenizer")
    return path


# ----------------------------------------------------------------------------------------------------- the base


def recipe_parts(cfg: RunConfig, tokenizer: Path, overrides: list[str] = ()) -> dict:
    """What the base model is a function of: base.yaml as written (its YAML content, not formatting or comments) and
    the overrides, the tokenizer's sha256, the data's content. Schema defaults are left out on purpose: a config key
    added elsewhere in the project does not invalidate the base."""
    from data.sources import source_fingerprint

    return {
        "config": yaml.safe_load((ROOT / BASE_CONFIG).read_text()),
        "overrides": list(overrides),
        "tokenizer": file_sha256(tokenizer / "tokenizer.json"),
        "data": [source_fingerprint(s) for s in cfg.data.sources],
    }


def base_key(cfg: RunConfig, tokenizer: Path, overrides: list[str] = ()) -> str:
    """The cache key of the base: a digest of ``recipe_parts``."""
    return json_digest(recipe_parts(cfg, tokenizer, overrides))


def deepspeed_launcher(nproc: int) -> list[str]:
    """``deepspeed --num_gpus N --master_port P`` from this venv, P a free port (another job on this machine may hold
    DeepSpeed's default one)."""
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
            str(free_port())]


def _train_command(overrides: list[str], nproc: int, resume: bool) -> list[str]:
    if nproc > 1:
        cmd = deepspeed_launcher(nproc) + [str(ROOT / "train.py")]
    else:
        cmd = [sys.executable, str(ROOT / "train.py")]
    cmd += ["--config", str(ROOT / BASE_CONFIG)] + [a for o in overrides for a in ("--set", o)]
    return cmd + (["--resume", "auto"] if resume else [])


def train_base(cfg: RunConfig, overrides: list[str], nproc: int, key: str) -> Path:
    """``train.py`` on the base config; resumes a run folder left by an interrupted build of the same key, else
    starts clean. Returns the run folder."""
    run = Path(cfg.output.dir)
    resume = run.is_dir() and _read_key(run / RUN_KEY_FILE) == key and not (run / "merged").exists()
    if run.exists() and not resume:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / RUN_KEY_FILE, {"key": key}, sort_keys=True)
    cmd = _train_command(overrides, nproc, resume)
    log(("resuming" if resume else "running") + ": OMP_NUM_THREADS=1 " + " ".join(cmd))
    t0 = time.perf_counter()
    # Two processes on two cores: one thread each (oversubscribed threads cost 30x, docs/notes.md).
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise TestbedError(f"train.py failed on {BASE_CONFIG} (exit status {done.returncode}); see its output "
                           "above. Run `python -m launch.testbed` again to resume from its last checkpoint")
    log(f"{BASE_CONFIG} trained in {time.perf_counter() - t0:.0f} s -> {run}")
    return run


def _publish(merged: Path, model_dir: Path, key: str, info: dict) -> Path:
    """Copy the final merged model to ``model_dir`` (temporary folder + rename); the key file is written last."""
    with atomic_dir(model_dir) as tmp:
        shutil.copytree(merged, tmp, dirs_exist_ok=True)
        write_json(tmp / KEY_FILE, {"key": key, **info}, sort_keys=True)
    return model_dir


def build(overrides: list[str] = (), nproc: int = 2, force: bool = False, model_dir: Path = MODEL_DIR) -> Path:
    """The testbed base model folder ``model_dir``, built if its key changed (or ``force``); returns it."""
    overrides = list(overrides)
    cfg = load_base(overrides)
    tokenizer = ensure_tokenizer(cfg)
    key = base_key(cfg, tokenizer, overrides)
    if not force and _read_key(model_dir / KEY_FILE) == key:
        log(f"base: reusing {model_dir} (same config, tokenizer and data; `--force` rebuilds)")
        return model_dir
    log(f"base: building {model_dir} from {BASE_CONFIG} (key {key[:12]})")
    t0 = time.perf_counter()
    run = train_base(cfg, overrides, nproc, key)
    seconds = round(time.perf_counter() - t0)
    _publish(run / "merged", model_dir, key, {"config": str(BASE_CONFIG), "overrides": overrides,
                                              "build_seconds": seconds, "processes": nproc})
    log(f"base: {model_dir} ready ({seconds} s)")
    return model_dir


# ----------------------------------------------------------------------------------------- the committed base


def recipe(overrides: list[str] = (), tokenizer_dir: Path | None = None) -> dict:
    """What a rebuild must reproduce exactly on any machine (the weights need not: float reductions differ across
    CPUs and thread counts): base.yaml's content and the overrides, the tokenizer's sha256 (its training is
    deterministic), the data behind each source, and the cache key made of them. Trains the tokenizer if needed
    (into ``tokenizer_dir`` in place of ``model.tokenizer``: a check that must not touch the build's own)."""
    cfg = load_base(overrides)
    if tokenizer_dir is not None:
        cfg.model = cfg.model.model_copy(update={"tokenizer": str(tokenizer_dir)})
    parts = recipe_parts(cfg, ensure_tokenizer(cfg), overrides)
    return {"config": parts["config"], "overrides": parts["overrides"], "tokenizer_sha256": parts["tokenizer"],
            "data": parts["data"], "key": json_digest(parts)}


def file_table(folder: Path) -> dict:
    """{file name: {"sha256", "bytes"}} of every file in ``folder`` but the manifest."""
    return {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size}
            for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}


def recipe_differences(manifest: dict, rebuilt: dict) -> list[str]:
    """The recipe items in which a rebuild differs from a manifest (empty: the same recipe)."""
    return [k for k in ("config", "overrides", "tokenizer_sha256", "data", "key") if manifest.get(k) != rebuilt[k]]


def install(model_dir: Path = MODEL_DIR, committed: Path = COMMITTED_DIR) -> Path:
    """Copy a built base into ``committed`` with ``manifest.json``: the recipe (``recipe``), the build command and
    its record (time, processes, machine), and the sha256 of every file. For a maintainer who changed the recipe."""
    info = json.loads((model_dir / KEY_FILE).read_text())
    rebuilt = recipe(info.get("overrides", []))
    if rebuilt["key"] != info["key"]:
        raise TestbedError(f"{model_dir} was built from another recipe than the current {BASE_CONFIG}, tokenizer "
                           "and data; run `python -m launch.testbed` first")
    with atomic_dir(committed) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != KEY_FILE:
                shutil.copy2(f, tmp / f.name)
        sets = "".join(f" --set {o}" for o in rebuilt["overrides"])
        write_json(tmp / MANIFEST, {
            "build_command": f"python -m launch.testbed --nproc {info.get('processes', 2)}{sets}",
            **rebuilt, "built": {"seconds": info.get("build_seconds"), "processes": info.get("processes"),
                                 "machine": machine()},
            "files": file_table(tmp)})
    return committed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.testbed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the base config (part of the cache key), e.g. train.precision=fp32")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (deepspeed --num_gpus; 1: plain python)")
    ap.add_argument("--force", action="store_true", help="rebuild the base even when its key matches")
    ap.add_argument("--install", action="store_true",
                    help="then copy it into models/testbed with its manifest (a new base to commit)")
    args = ap.parse_args(argv)

    def run(_) -> None:
        if args.nproc < 1:
            raise TestbedError(f"--nproc must be >= 1, got {args.nproc}")
        built = build(args.set, args.nproc, args.force)
        committed = COMMITTED_DIR / MANIFEST
        if args.install:
            log(f"installed {built} into {install(built)}")
        elif committed.is_file():
            diff = recipe_differences(json.loads(committed.read_text()), recipe(args.set))
            log(f"the committed base ({COMMITTED_DIR.relative_to(ROOT)}) has " +
                 (f"another recipe ({', '.join(diff)} differ): `--install` replaces it" if diff else
                  "the same recipe (config, tokenizer, data); its weights are not bit-identical to this build's "
                  "unless built on the same CPU with the same processes"))

    return run_cli(run)


if __name__ == "__main__":
    exit_process(main())
