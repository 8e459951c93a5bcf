"""The memory plan (training/memory.py): hand-computed numbers for the tiny config, the per-layer activation count
against what autograd really saves in the model train.py builds, and the CLI / `train.py --dry-run` entry points."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.schema import load_run_config
from training.model import model_config, trainable_model
from utils.cli import UserError
from training.memory import (
    GIB,
    MemoryPlanError,
    count_params,
    format_plan,
    layer_activation_bytes,
    planned_config,
    plan_memory,
    setup_of,
    shape_of,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/cpu_tiny.yaml"


def _items(plan) -> dict[str, tuple[float, float]]:
    return {i.name: (i.gpu, i.cpu) for i in plan.items}


def test_tiny_plan_matches_numbers_computed_by_hand():
    # cpu_tiny: tiny-llama (hidden 64, 2 layers, 2 heads + 1 KV head of 32, MLP 128, vocab 260, tied head), fp32,
    # LoRA r=8 on q,k,v,o + trainable embed_tokens and norms, ZeRO-2 on 1 GPU, micro-batch 2 x 512, sdpa, chunk 256.
    plan = plan_memory(load_run_config(TINY), world=1, gpu_mem_gib=80)
    # Parameters: embed 260*64 = 16,640; per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate/up/down 3*64*128
    # + 2 norms 2*64 = 36,992; 2 layers + final norm 64 -> 90,688. LoRA per layer: q 8*(64+64) + k 8*(64+32)
    # + v 8*(64+32) + o 8*(64+64) = 3,584 -> 7,168. Trainable: LoRA + embed 16,640 + norms 5*64 = 24,128.
    trainable, frozen = 24_128, 90_688 - 16_640 - 320
    T = 2 * 512
    # One layer, fp32 (every dtype 4 B): norms: first shares the fp32 layer input, second 4*64, 2 rsqrt, trainable
    # norms keep 2 normalized inputs 2*4*64 -> 776; q/k/v share one fp32 input 4*64 = 256 (o's is the attention
    # output); lora_A outputs 4*8*4 = 128; attention q,k,v,out (2*64 + 2*32)*4 + lse 2*4 = 776; MLP 3*128*4 = 1536.
    per_layer = 776 + 256 + 128 + 776 + 1536
    expected = {
        "frozen weights": frozen * 4,
        "trainable weights (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "optimizer states (AdamW, fp32)": trainable * 8,
        "layer inputs (checkpoints)": T * (2 * 64 * 4 + 2 * 32 * 4),  # 2 layers' inputs + cos/sin (head_dim 32)
        "attention outputs (kept)": T * 2 * (2 * 32 * 4 + 2 * 4),  # 2 layers x (2 heads x 32 x 4 B + lse)
        "one layer recomputed": T * per_layer,
        "backward gradient buffers": T * (2 * 64 * 4 + 2 * 128 * 4),
        # final norm's fp32 input + final hidden + its scored copy (4 B each) + the trainable norm's normalized
        # input, then 3 fp32 logits chunks of 256 positions x 260
        "loss (final norm + chunked LM head)": T * 64 * (4 + 4 + 4 + 4) + 3 * 256 * 260 * 4,
    }
    assert {k: v[0] for k, v in _items(plan).items()} == expected
    assert plan.total == 8_983_552 == sum(expected.values())
    assert plan.fits and plan.cpu_total == 0


def test_sequence_parallel_and_tiled_mlp_by_hand():
    # cpu_tiny over 2 GPUs as one sequence-parallel group: each holds 2 rows x 256 of the 512 positions.
    cfg = load_run_config(TINY, ["train.sequence_parallel_size=2", "train.tiled_mlp=true"])
    items = {k: v[0] for k, v in _items(plan_memory(cfg, world=2)).items()}
    T = 2 * 512 // 2
    assert items["layer inputs (checkpoints)"] == T * (2 * 64 * 4 + 2 * 32 * 4)
    # per layer as in the tiny plan, but the tiled MLP keeps only its fp32 input (64 x 4 instead of 3 x 128 x 4),
    # and the 1 KV head is replicated to one per rank of the 2 (attention (2*64 + 2*2*32)*4 + lse 2*4 = 1,032)
    assert items["one layer recomputed"] == T * (776 + 256 + 128 + 1_032 + 64 * 4)
    assert items["backward gradient buffers"] == T * 2 * 64 * 4
    assert items["tiled MLP, one tile"] == 64 * 5 * 128 * 4  # 256 positions in tiles of 64 (= hidden)
    assert items["Ulysses all-to-all buffers"] == 2 * T * (2 * 2 + 2 * 2) * 32 * 4
    assert items["gradients (fp32)"] == 24_128 * 4 / 2  # ZeRO-2 shards over both ranks of the group
    with pytest.raises(UserError, match="3 process"):  # the plan of a launch train.py would refuse
        plan_memory(cfg, world=3)
    # offloaded checkpoints: the newest layer input (and cos/sin) stays on the GPU, the other layer's goes to CPU
    offload = _items(plan_memory(load_run_config(TINY, ["train.offload_checkpoints=true"]), world=1))
    assert offload["layer inputs (checkpoints)"] == (1024 * (64 * 4 + 2 * 32 * 4), 1024 * 64 * 4)


def test_zero3_bf16_offload_and_eager_document_mask_by_hand():
    cfg = load_run_config(TINY, ["train.precision=bf16", "deepspeed.config=configs/deepspeed/zero3.json",
                                 "model.attn_implementation=eager", "data.mode=reset", "data.block_cross_doc=true",
                                 "train.micro_batch_size=1"])
    items = _items(plan_memory(cfg, world=4))
    trainable, frozen = 24_128, 73_728
    assert items["frozen weights"] == (frozen * 2 / 4, 0)  # bf16 base, split over 4 GPUs by ZeRO-3
    assert items["trainable weights (fp32)"] == (trainable * 4 / 4, 0)
    assert items["gradients (fp32)"] == (trainable * 4 / 4, 0)
    assert items["optimizer states (AdamW, fp32)"] == (trainable * 8 / 4, 0)
    # largest gathered module: one layer, 36,992 + 3,584 LoRA parameters (the embedding has 16,640), in bf16
    assert items["ZeRO-3 gathered module"] == ((36_992 + 3_584) * 2, 0)
    # eager keeps fp32 probabilities and their bf16 copy for one recomputed layer: 1 x 2 heads x 512^2 x (4 + 2)
    assert items["eager attention probabilities (L^2)"] == (2 * 512 * 512 * 6, 0)
    # the additive document mask of eager attention, in bf16
    assert items["document mask (L^2)"] == (512 * 512 * 2, 0)

    offload = _items(plan_memory(load_run_config(TINY, ["deepspeed.config=configs/deepspeed/zero3_offload.json"]),
                                 world=2))
    assert offload["frozen weights"] == (0, frozen * 4 / 2)
    assert offload["optimizer states (AdamW, fp32)"] == (0, trainable * 8 / 2)
    assert offload["gradients (fp32)"] == (0, trainable * 4 / 2)


def test_zero_stages_split_optimizer_then_gradients_then_weights():
    def plan(stage):
        cfg = load_run_config(TINY, [f"deepspeed.config=configs/deepspeed/zero{stage}.json"])
        return _items(plan_memory(cfg, world=8))

    p0, p1, p2, p3 = (plan(s) for s in range(4))
    opt = "optimizer states (AdamW, fp32)"
    assert p0[opt][0] == 8 * p1[opt][0] and p1[opt] == p2[opt] == p3[opt]
    assert p0["gradients (fp32)"] == p1["gradients (fp32)"] == (8 * p2["gradients (fp32)"][0], 0)
    assert p2["frozen weights"][0] == 8 * p3["frozen weights"][0]
    assert "ZeRO-3 gathered module" in p3 and "ZeRO-3 gathered module" not in p2


def _saved_bytes(model, length: int, autocast: bool) -> int:
    """Bytes of the tensors autograd saves in the first decoder layer for one row of ``length`` tokens (the layer
    input, cos/sin and parameters excluded; storages counted once)."""
    layer = model.get_base_model().model.layers[0]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    ids = torch.randint(0, 250, (1, length), generator=torch.Generator().manual_seed(0))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            model.get_base_model().model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        handle.remove()
        kwargs = dict(captured["kwargs"])
        x = (captured["args"][0] if captured["args"] else kwargs.pop("hidden_states")).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, *captured["args"][1:], **kwargs)
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    shared |= {t.untyped_storage().data_ptr() for t in kwargs.get("position_embeddings") or ()}
    return sum(n for ptr, n in storages.items() if ptr not in shared)


ARCH = ("model.arch={hidden_size: 256, intermediate_size: 688, num_attention_heads: 4, num_key_value_heads: 2, "
        "head_dim: 64}")


@pytest.mark.parametrize("precision,sets", [
    ("fp32", ["lora.trainable_extra=[]"]),
    ("fp32", ["lora.trainable_extra=[embed_tokens, norm]"]),
    ("fp32", ["lora.trainable_extra=[]", "lora.dropout=0.1"]),
    ("bf16", ["lora.trainable_extra=[]"]),
    ("bf16", ["lora.trainable_extra=[embed_tokens, norm]"]),
    ("bf16", ["lora.trainable_extra=[]", "lora.dropout=0.1"]),
    ("bf16", ["lora.target_modules=[q_proj, v_proj, down_proj]"]),
])
def test_layer_activations_equal_what_autograd_saves_in_the_trained_model(precision, sets):
    cfg = load_run_config(TINY, [ARCH, f"train.precision={precision}", "train.gradient_checkpointing=false", *sets])
    config, _ = planned_config(cfg)
    model = trainable_model(cfg, model_config(cfg), precision, "sdpa").train()
    torch.manual_seed(0)
    # Difference of two lengths: per-token bytes, without the constant autocast copies of LoRA weights.
    measured = (_saved_bytes(model, 512, precision == "bf16") - _saved_bytes(model, 256, precision == "bf16")) / 256
    planned = layer_activation_bytes(shape_of(config), count_params(cfg, config), setup_of(cfg, 1, config))
    assert planned == measured, (planned, measured)


def test_eager_attention_keeps_heads_x_length_squared():
    cfg = load_run_config(TINY, [ARCH, "train.precision=bf16", "train.gradient_checkpointing=false",
                                 "lora.trainable_extra=[]"])
    model = trainable_model(cfg, model_config(cfg), "bf16", "eager").train()
    growth = _saved_bytes(model, 512, True) - _saved_bytes(model, 256, True)
    config, _ = planned_config(cfg)
    per_token = layer_activation_bytes(shape_of(config), count_params(cfg, config), setup_of(cfg, 1, config))
    quadratic = 4 * (512**2 - 256**2) * 6  # 4 heads; fp32 probabilities + their bf16 copy
    assert abs(growth - (per_token * 256 + quadratic)) < 0.01 * growth


def test_llama2_7b_falls_back_to_the_table_of_published_shapes():
    cfg = load_run_config(ROOT / "configs/ntk_parts_32k.yaml")
    plan = plan_memory(cfg, world=8)
    text = format_plan(plan)
    assert "table of published shapes" in text
    # 6,738,415,616 is Llama-2-7B's published parameter count; LoRA r=16 on q,k,v,o adds 32 x 4 x 16 x 8192
    assert "6,738,415,616 base + 16,777,216 LoRA" in text
    items = _items(plan)
    assert items["frozen weights"][0] == (6_738_415_616 - 32_000 * 4096 - 65 * 4096) * 2 / 8
    assert items["layer inputs (checkpoints)"][0] == 32_768 * (32 * 4096 * 2 + 2 * 128 * 2)  # bf16 residual stream
    assert 15 * GIB < plan.total < 40 * GIB and plan.fits
    # the same run on one 80 GB GPU does not fit (the bf16 weights alone are 12.3 GiB, activations 25 GiB, plus
    # the full AdamW state of the trainable embedding)
    assert not plan_memory(cfg, world=1, gpu_mem_gib=24).fits


def test_unknown_hub_model_fails_with_one_line():
    cfg = load_run_config(TINY, ["model.name=someone/unknown-model"])
    with pytest.raises(MemoryPlanError, match="needs the model's config"):
        plan_memory(cfg)


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_train_dry_run_prints_config_and_plan_and_starts_nothing(tmp_path):
    run = tmp_path / "run"
    r = _run("train.py", "--config", str(TINY), "--set", f"output.dir={run}", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "resolved config:" in r.stdout and f"dir: {run}" in r.stdout
    assert "memory plan per GPU" in r.stdout and "8.567 MiB  fits in 80 GiB" in r.stdout
    assert not run.exists()  # no run folder, no process group


@pytest.mark.slow
def test_memory_cli_reports_world_size_and_bad_input():
    r = _run("-m", "launch.memory", "--config", str(TINY), "--world-size", "4",
             "--set", "deepspeed.config=configs/deepspeed/zero3.json")
    assert r.returncode == 0 and "ZeRO-3 over 4 GPU(s)" in r.stdout
    bad = _run("-m", "launch.memory", "--config", str(TINY), "--set", "lora.trainable_extra=[nope]")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: lora.trainable_extra")
