"""Sequence parallelism (DeepSpeed Ulysses) and tiled MLPs, with real DeepSpeed processes on CPU (gloo).

Runs are `configs/cpu_tiny.yaml`: tiny-llama has 2 query heads and 1 key/value head, so a group of 2 ranks splits the
query heads and replicates the key/value head. fp32 throughout: the comparisons are to 1e-5.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.schema import load_run_config
from tests.helpers import ROOT, losses, train, train_cmd, train_env
from training.parallel import shard_rows

PASSKEY = "data.sources=[{kind: synthetic, name: passkey, max_docs: 400}]"  # 128-1,024-token documents: rows reset
MLP_LORA = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def assert_same_training(a: Path, b: Path, steps: int = 5, tol: float = 1e-5) -> None:
    """Per-step losses, gradient norms, trained LoRA weights and trainable extras of runs ``a`` and ``b`` agree within
    ``tol`` (the norms relatively), and training moved the weights (LoRA B starts at 0)."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == steps, (la, lb)
    assert max(abs(x - y) for x, y in zip(la, lb)) < tol, (la, lb)
    na, nb = (metric(run, "grad_norm") for run in (a, b))  # AdamW hides a uniformly scaled gradient; the norm not
    assert all((x is None and y is None) or abs(x - y) <= tol * x for x, y in zip(na, nb)), (na, nb)
    for name in ("adapter_model", "trainable_extra"):
        wa, wb = (load_file(run / "adapter" / f"{name}.safetensors") for run in (a, b))
        assert wa.keys() == wb.keys() and wa
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < tol, (name, worst)
    assert any(v.abs().max() > 0 for k, v in load_file(a / "adapter" / "adapter_model.safetensors").items()
               if "lora_B" in k)


def metric(run: Path, key: str) -> list:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def tokens_seen(run: Path) -> int:
    return metric(run, "tokens_seen")[-1]


@pytest.mark.slow
@pytest.mark.parametrize("sets", [
    ("data.mode=reset", PASSKEY),
    ("data.mode=pose", "data.pose_target_len=2048", "train.micro_batch_size=1", "train.grad_accum=2"),
    ("deepspeed.config=configs/deepspeed/zero3.json",),
], ids=["reset", "pose-accum", "zero3-concat"])
def test_sequence_parallel_size_2_trains_as_one_process(tmp_path, sets):
    """The same rows, whole on one process or split over two: the same losses and weights after 5 steps (reset
    rows restart positions inside a shard; PoSE rows skip positions between shards, here with gradient accumulation;
    ZeRO-3 averages gradients over every rank, which training.parallel.gradient_scale corrects). Concat rows under
    ZeRO-2 are the tiled-MLP and 2 x 2-rank tests' case."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *sets, "train.max_steps=5")
    r = train(two, *sets, "train.max_steps=5", "train.sequence_parallel_size=2", nproc=2)
    assert "2 process(es) on cpu (1 data-parallel x 2 sequence-parallel)" in r.stdout
    assert_same_training(one, two)
    assert tokens_seen(one) == tokens_seen(two) == 5 * 2 * 512  # each row counted once, not once per shard


@pytest.mark.slow
def test_two_data_parallel_by_two_sequence_parallel_ranks_match_two_data_parallel_ranks_under_zero2(tmp_path):
    dp, both = tmp_path / "dp", tmp_path / "dp-sp"
    train(dp, "train.max_steps=5", nproc=2)
    r = train(both, "train.max_steps=5", "train.sequence_parallel_size=2", nproc=4)
    assert "4 process(es) on cpu (2 data-parallel x 2 sequence-parallel)" in r.stdout
    assert_same_training(dp, both)
    assert tokens_seen(dp) == tokens_seen(both)


@pytest.mark.slow
def test_tiled_mlp_with_lora_on_the_mlp_under_sequence_parallelism_trains_as_the_plain_mlp(tmp_path):
    plain, tiled = tmp_path / "plain", tmp_path / "tiled"
    train(plain, MLP_LORA, "train.max_steps=5")
    train(tiled, MLP_LORA, "train.max_steps=5", "train.tiled_mlp=true", "train.sequence_parallel_size=2", nproc=2)
    assert_same_training(plain, tiled)


@pytest.mark.slow
def test_resume_under_sequence_parallelism_continues_exactly_and_another_size_is_refused(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, "train.max_steps=5")
    train(split, "train.max_steps=3", "train.sequence_parallel_size=2", nproc=2)
    assert (split / "checkpoints" / "step-000003").is_dir()
    r = train(split, "train.max_steps=5", resume="auto", check=False)  # the same run at size 1
    assert r.returncode == 2 and "config differs" in r.stderr and "train.sequence_parallel_size" in r.stderr
    train(split, "train.max_steps=5", "train.sequence_parallel_size=2", nproc=2, resume="auto")
    assert_same_training(whole, split)


@pytest.mark.parametrize("sets,world,message", [
    (("train.sequence_parallel_size=3",), 3, "does not divide the model's 2 attention heads"),
    (("train.sequence_parallel_size=3", "model.arch={num_attention_heads: 6, num_key_value_heads: 2}"), 3,
     "train.sequence_parallel_size 3 and the model's 2 key/value heads: one must divide the other"),
    (("train.sequence_parallel_size=2",), 1, "1 process(es) is not a multiple of train.sequence_parallel_size 2"),
    (("train.sequence_parallel_size=2", "data.seq_len=511"), 2, "data.seq_len 511 does not split"),
    (("train.sequence_parallel_size=2", "model.attn_implementation=eager"), 2, "eager cannot run under sequence"),
    (("train.sequence_parallel_size=2", "data.mode=reset", "data.block_cross_doc=true"), 2,
     "data.block_cross_doc with sdpa under sequence parallelism"),
    (("train.offload_checkpoints=true",), 1, "this run is on the CPU, where they are in CPU memory already"),
])
def test_long_row_refusals_come_before_any_process_group(tmp_path, sets, world, message):
    """One ``error:`` line, exit 2, no run folder. WORLD_SIZE is what a launcher of ``world`` processes sets; the
    check reads it before the rendezvous (had the check passed, the one process would fail later, differently)."""
    run = tmp_path / "bad"
    proc = subprocess.run(train_cmd(run, *sets), cwd=ROOT, env=train_env(WORLD_SIZE=str(world)),
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


def test_shard_rows_shifts_labels_over_the_whole_row_before_splitting():
    ids = torch.arange(12).reshape(2, 6)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": ids % 4}
    shards = [shard_rows(batch, r, 3) for r in range(3)]
    assert [s["input_ids"].tolist()[0] for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert [s["labels"].tolist()[1] for s in shards] == [[7, 8], [9, 10], [11, -100]]  # a shard's last target: the
    assert shards[1]["position_ids"].tolist() == [[2, 3], [0, 1]]                       # next shard's first token


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_tiled_mlp_runs_in_tiles_and_gives_the_plain_gradients(precision, tol):
    """TiledMLP on tiny-llama (hidden 64) at 512 positions: 8 tiles per MLP in the forward and again in the
    backward, the same loss and LoRA/extra gradients as the plain MLP (bf16: the recompute runs under the forward's
    autocast too)."""
    from training.model import LossModule, model_config, trainable_model
    from training.parallel import tile_mlps

    cfg = load_run_config(ROOT / "configs/cpu_tiny.yaml", [MLP_LORA])
    ids = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(0))
    batch = (ids, ids.clone(), torch.arange(512).expand(2, -1))

    def run(tiled: bool):
        torch.manual_seed(0)
        model = trainable_model(cfg, model_config(cfg), precision, "sdpa")
        calls = []
        gate = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.gate_proj"))
        gate.register_forward_hook(lambda *a: calls.append(1))
        if tiled:
            assert tile_mlps(model) == 2
        loss = LossModule.of(cfg, model, precision).train()(*batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, len(calls)

    (plain_loss, plain_grads, plain_calls), (tiled_loss, tiled_grads, tiled_calls) = run(False), run(True)
    assert abs(plain_loss - tiled_loss) < tol
    assert any("mlp" in n for n in plain_grads) and plain_grads.keys() == tiled_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(tiled_grads[n], plain_grads[n], atol=tol, rtol=10 * tol)
    # gradient checkpointing recomputes the layer once in the backward: plain 1 + 1 calls, tiled 8 + 8 + 8
    assert plain_calls == 2 and tiled_calls == 3 * 8, (plain_calls, tiled_calls)
