"""The training benches and the shared-prefix bench end to end at tiny settings (tiny-llama preset, 256-768 tokens,
one thread per process): every path runs, prints its figures and the final JSON line; the memory cap of
bench/max_seq_len.py kills a probe that goes over it; the shared-prefix sweep reuses and gives the same answers. About
a minute on 2 CPU cores."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _bench(script: str, *args: str, out: Path) -> dict:
    """Run a bench; returns its last stdout line (the JSON), checked against the file --out wrote."""
    proc = subprocess.run([sys.executable, f"bench/{script}", *args, "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record == json.loads(out.read_text())
    return record


def test_train_throughput_all_paths(tmp_path):
    paths = ["ours-fp32", "ours", "ours-zero2x2", "trainer", "trainer-bf16"]
    r = _bench("train_throughput.py", "--model", "tiny-llama", "--lengths", "384", "--warmup-len", "128",
               "--paths", ",".join(paths), "--matmul-shapes", "256x256x256", out=tmp_path / "train.json")
    assert {"cpu", "cores", "torch", "date"} <= r["machine"].keys()
    assert r["matmul_tflops"]["fp32"]["best"] > 0 and r["matmul_tflops"]["bf16"]["best"] > 0
    got = {(row["variant"], row["seq_len"]): row for row in r["results"]}
    assert got.keys() == {(p, n) for p in paths for n in (384,)}  # the warm-up step is not reported
    for row in r["results"]:
        assert row["tokens_per_s"] > 0 and row["peak_rss_gib"] > 0 and 0 < row["mfu"]
        assert row["tokens"] == row["seq_len"] * row["procs"]
    two = got[("ours-zero2x2", 384)]
    assert two["procs"] == 2 and len(two["peak_rss_gib_per_proc"]) == 2
    assert two["peak_rss_gib"] == pytest.approx(sum(two["peak_rss_gib_per_proc"]), abs=2e-3)
    assert got[("trainer", 384)]["precision"] == "fp32" and got[("trainer-bf16", 384)]["precision"] == "bf16"
    comparisons = {(x["comparison"], x["seq_len"]) for x in r["ratios"]}
    assert ("equal precision: fp32 = fp32", 384) in comparisons
    assert ("default: ours vs trainer", 384) in comparisons
    for x in r["ratios"]:
        assert x["speed_ratio"] > 0 and x["memory_ratio"] > 0


def test_max_seq_len_search_and_cap(tmp_path):
    r = _bench("max_seq_len.py", "--model", "tiny-llama", "--min-len", "256", "--max-len", "384", "--cap-gib", "4",
               out=tmp_path / "fits.json")
    assert r["probe_lengths"] == [256, 384]
    assert r["longest"] == {"trainer": 384, "ours": 384} and r["ours_at_probe_limit"]
    assert [(p["variant"], p["seq_len"]) for p in r["probes"]] == [("trainer", 256), ("trainer", 384), ("ours", 384)]
    assert all(p["fits"] and 0 < p["peak_rss_gib"] <= 4 for p in r["probes"])

    # A cap below what Python with torch needs: the parent's polling kills every probe.
    r = _bench("max_seq_len.py", "--model", "tiny-llama", "--min-len", "256", "--max-len", "384", "--cap-gib", "0.1",
               out=tmp_path / "killed.json")
    assert r["longest"] == {"trainer": None, "ours": None}
    assert r["probes"] and all(not p["fits"] and p["why"].startswith("killed") and p["polled_peak_gib"] >= 0.1
                               for p in r["probes"])


def test_max_seq_len_only_probes_the_named_variants_upward(tmp_path):
    variants = ["ours-tiled", "ours-sp-tiled", "trainer"]
    r = _bench("max_seq_len.py", "--model", "tiny-llama", "--lengths", "256,384", "--cap-gib", "4",
               "--only", ",".join(variants), out=tmp_path / "only.json")
    assert r["longest"] == {v: 384 for v in variants}
    # each variant upward from the first length; tiny-llama's 2 heads split over 2 processes
    assert [(p["variant"], p["seq_len"]) for p in r["probes"]] == [(v, n) for v in variants for n in (256, 384)]
    assert all(p["fits"] and 0 < p["peak_rss_gib"] <= 4 and 0 < p["step_seconds"] < p["seconds"] for p in r["probes"])


def test_loss_tiling_bench_agrees_with_deepspeeds_tiled_loss(tmp_path):
    proc = subprocess.run([sys.executable, "bench/loss_tiling.py", "--lengths", "512", "--chunk", "128", "--out",
                           str(tmp_path / "loss.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "losses and gradients agree" in proc.stdout
    rows = json.loads((tmp_path / "loss.json").read_text())["rows"]
    assert [r["way"] for r in rows] == ["ours", "deepspeed"] and all(r["seconds"] > 0 for r in rows)


BENCH_STEP = """
import json, sys
import torch
from bench.train_paths import ours_steps
from configs.schema import load_run_config
from data.loader import PackedLoader
from data.pack import build_packed
from training.model import tokenizer_of

cfg = load_run_config("configs/cpu_tiny.yaml", sys.argv[1:])
loader = PackedLoader(build_packed(cfg.data, tokenizer_of(cfg)), batch_size=cfg.train.micro_batch_size, rank=0,
                      world_size=1, seed=cfg.train.seed)
batches = iter(loader)
first_two = [next(batches), next(batches)]  # the recipe's first two batches
print(json.dumps([s["loss"] for s in ours_steps(cfg, "fp32", first_two, torch.device("cpu"))["steps"]]))
"""


def test_the_bench_step_is_the_recipe_step(tmp_path):
    """The bench's "ours" path and train.py on the same two batches: the same two losses (the first checks the
    model, its RoPE scaling and the loss; the second the optimizer step: LoRA, trainable extras, AdamW, the LR
    schedule). Both are built from the same public functions of training/."""
    sets = [f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.precision=fp32", "wandb.enabled=false",
            "eval=null"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    run = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu_tiny.yaml",
                          *(a for s in sets for a in ("--set", s))], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    recipe = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bench = subprocess.run([sys.executable, "-c", BENCH_STEP, *sets], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    losses = json.loads(bench.stdout.strip().splitlines()[-1])
    assert len(recipe) == 2 and recipe[0] != recipe[1]
    assert losses == pytest.approx(recipe, rel=1e-6, abs=1e-6)


def test_shared_prefix_bench_reuses_and_agrees(tmp_path):
    out = tmp_path / "shared.json"
    proc = subprocess.run([sys.executable, "bench/shared_prefix.py", "--model", "tiny-llama", "--length", "768",
                           "--samples", "1", "--dtype", "float32", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["prompts"] == 5 and r["same_answers"] == 5
    # 5 depths of one haystack: depths 0.75 and 1 reuse the prefix before the previous needle (0.5 and 0.75 of the
    # prompt); 0.25 and 0.5 would reuse under a third and prefill in full: (1 + 1 + 1 + 0.5 + 0.25) / 5
    assert 0.7 < r["shared"]["prefilled_share"] < 0.85  # at 768 tokens the instruction and question count too
    assert "answers the same" in proc.stdout.splitlines()[-1]


def test_bf16_rounding_rounds_linears_both_ways_and_trains(tmp_path):
    """bench/bf16_rounding.py: a linear's and attention's outputs and input gradients are bf16 values kept in fp32, and
    a linear replaced after the patch (ZeRO-3) stops the run; and
    train.py run through it on the same two batches gives losses within bf16's rounding of plain fp32 train.py's, but
    not equal to them (the rounding reaches the real training path)."""
    import torch
    import torch.nn.functional as F

    import bench.bf16_rounding as rounding

    saved = F.linear, F.scaled_dot_product_attention
    try:
        rounding.patch()
        x = torch.randn(64, 32, requires_grad=True)
        layer = torch.nn.Linear(32, 16)
        y = layer(x)
        y.pow(2).sum().backward()
        for t in (y.detach(), x.grad, layer.weight.grad):
            assert torch.equal(t, t.bfloat16().float())
        assert not torch.equal(y.detach(), saved[0](x, layer.weight, layer.bias).detach())  # it did round
        q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.pow(2).sum().backward()
        for t in (out.detach(), q.grad, k.grad, v.grad):
            assert torch.equal(t, t.bfloat16().float())
        F.linear = saved[0]  # what ZeRO-3's Init does: attention then refuses to run unrounded linears
        with pytest.raises(RuntimeError, match="ZeRO"):
            F.scaled_dot_product_attention(q, k, v)
    finally:
        F.linear, F.scaled_dot_product_attention = saved
    sets = ["train.max_steps=2", "train.precision=fp32", "wandb.enabled=false", "eval=null"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    losses = {}
    for name, script in (("fp32", "train.py"), ("bf16", "bench/bf16_rounding.py")):
        run = subprocess.run([sys.executable, script, "--config", "configs/cpu_tiny.yaml", "--set",
                              f"output.dir={tmp_path / name}", *(a for s in sets for a in ("--set", s))],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[name] = [json.loads(line)["loss"]
                        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["bf16"]) == 2 and losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
