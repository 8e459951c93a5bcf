"""The main job on the embedded CPU default (``make demo``): the testbed's context-extension experiment end to end.

    python -m launch.demo

1. the testbed base (``launch.testbed``: built once, reused while its configs, tokenizer and data are unchanged);
2. YaRN s=4 LoRA fine-tuning: ``OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train.py --config
   configs/testbed/yarn_4x.yaml`` into ``runs/demo/yarn_4x`` (replaced on every run);
3. perplexity (bundled held-out book) and passkey at 1x, 2x, 4x and 8x the native 256 tokens, with the settings of
   the config's ``eval:`` section, for three models: the base without scaling, the base with training-free YaRN
   s=4, and the fine-tuned model; six evaluation processes, two at a time with one thread each (two cores; more
   threads per process only fight over them), in bfloat16 where the CPU has bf16 units (``eval_dtype``), each output
   line prefixed with its name;
4. ``eval.compare`` over the results: the table is printed and the plots' paths given (``runs/demo/compare/``).

Every command is printed before it runs, with the time since the start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from configs.schema import load_run_config
from launch.testbed import MODEL_DIR, TestbedError, build, deepspeed_launcher
from training.runtime import choose_precision
from utils.cli import exit_process, run_cli

CONFIG = Path("configs/testbed/yarn_4x.yaml")
DEMO_DIR = Path("runs/demo")
_print_lock = threading.Lock()
_T0 = time.perf_counter()


def _say(msg: str) -> None:
    with _print_lock:
        print(f"[demo {time.perf_counter() - _T0:6.0f}s] {msg}", flush=True)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_logged(name: str, cmd: list[str]) -> None:
    """Run ``cmd``, printing each line of its output prefixed with ``name``; raise TestbedError if it fails."""
    _say(f"{name}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
                            errors="replace", bufsize=1)
    for line in proc.stdout:
        # tqdm redraws with carriage returns: keep the last state of each line only
        line = line.rstrip("\n").rsplit("\r", 1)[-1]
        if line.strip():
            with _print_lock:
                print(f"  [{name}] {line}", flush=True)
    if proc.wait() != 0:
        raise TestbedError(f"{name} failed (exit status {proc.returncode}): {' '.join(cmd)}")


def eval_dtype() -> str:
    """bfloat16 where the CPU has bf16 matrix units (train.py's ``auto`` rule), else float32. Measured on the testbed
    base (this 2-core machine, one thread): 2.5x faster at 256 tokens, 1.9x at 2048, perplexity equal to 1e-4
    relative (logits are upcast to fp32 either way)."""
    return "bfloat16" if choose_precision("auto", torch.device("cpu"))[0] == "bf16" else "float32"


def eval_jobs(run: Path, factor: float, e, out: Path, dtype: str = "float32") -> list[tuple[str, list[str]]]:
    """(name, command) of every evaluation: perplexity and passkey for base, training-free and fine-tuned."""
    py = sys.executable
    lengths = ",".join(map(str, e.perplexity_lengths))
    models = [("base", ["--model", str(MODEL_DIR)]),
              (f"yarn x{factor:g}", ["--model", str(MODEL_DIR), "--rope", "yarn", "--factor", f"{factor:g}"]),
              (f"yarn x{factor:g} fine-tuned", ["--model", str(run)])]
    common = ["--out", str(out), "--threads", "1", "--dtype", dtype]
    ppl = [(f"ppl {name}", [py, "-m", "eval.perplexity", *m, *common, "--lengths", lengths,
                            "--mode", e.perplexity_mode] + (["--stride", str(e.stride)] if e.stride else []))
           for name, m in models]
    passkey = [(f"passkey {name}", [py, "-m", "eval.passkey", *m, *common,
                                    "--lengths", ",".join(map(str, e.passkey_lengths)),
                                    "--depths", ",".join(f"{d:g}" for d in e.passkey_depths),
                                    "--trials", str(e.passkey_trials)])
               for name, m in models]
    return ppl + passkey  # the long ones first, so the two workers finish together


def demo(parallel: int = 2) -> Path:
    cfg = load_run_config(CONFIG)
    if cfg.eval is None or not cfg.eval.perplexity_lengths or not cfg.eval.passkey_lengths:
        raise TestbedError(f"{CONFIG} needs an eval: section with perplexity_lengths and passkey_lengths")
    _say("step 1/4: testbed base")
    build()
    run = DEMO_DIR / CONFIG.stem
    if run.exists():
        shutil.rmtree(run)
    _say(f"step 2/4: {cfg.rope.method} x{cfg.rope.factor:g} LoRA fine-tuning, 2 processes")
    # eval=null: the evaluations run below, two processes at a time, rather than inside rank 0 of the training job
    run_logged("train", deepspeed_launcher(2) + ["train.py", "--config", str(CONFIG),
                                                 "--set", f"output.dir={run}", "--set", "eval=null"])
    dtype = eval_dtype()
    _say(f"step 3/4: evaluations ({parallel} at a time, {dtype})")
    out = DEMO_DIR / "eval"
    if out.exists():
        shutil.rmtree(out)
    jobs = eval_jobs(run, cfg.rope.factor, cfg.eval, out, dtype)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(run_logged, name, cmd) for name, cmd in jobs]:
            future.result()
    _say("step 4/4: comparison")
    compare = DEMO_DIR / "compare"
    run_logged("compare", [sys.executable, "-m", "eval.compare", str(out), "--out", str(compare)])
    print()
    print((compare / "compare.md").read_text())
    for name in ("compare.md", "compare.csv", "perplexity.png", "passkey.png", "ruler.png"):
        if (compare / name).is_file():
            print(f"  {compare / name}")
    print(f"  per-model results (with loss by position): {out}/*/perplexity.md, passkey.md, *.png")
    _say("done")
    return compare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=2, help="evaluation processes at a time (one thread each)")
    args = ap.parse_args(argv)
    return run_cli(lambda _: demo(max(1, args.parallel)))


if __name__ == "__main__":
    exit_process(main())
