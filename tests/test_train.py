"""train.py end to end: real DeepSpeed processes (gloo on CPU), real LoRA, real checkpoints and W&B offline runs.

Every run here is `configs/cpu_tiny.yaml` (tiny-llama, YaRN s=2, 512-token rows) launched the way a user would.
"""

import gzip
import json
import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PY, ROOT, losses, train, train_cmd, train_env

pytestmark = pytest.mark.slow


def test_one_and_two_processes_agree_at_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, "train.micro_batch_size=2", "train.max_steps=5")
    train(two, "train.micro_batch_size=1", "train.max_steps=5", nproc=2)
    a, b = losses(one), losses(two)
    assert abs(a[4] - b[4]) < 1e-3, (a, b)


def test_a_second_launch_into_a_busy_run_folder_is_refused(tmp_path):
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    lock = run / "run.lock"
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    with open(lock, "w") as f:  # a live launch: it holds the flock on run.lock
        json.dump(holder, f)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        r = train(run, "train.max_steps=2", check=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert f"is in use by another launch (pid {os.getpid()} on {socket.gethostname()})" in err[0]
    assert [p.name for p in run.iterdir()] == ["run.lock"]  # nothing else written
    # the file a SIGKILLed launch leaves: nobody holds its lock, even if its PID now belongs to a live process
    lock.write_text(json.dumps(holder))
    r = train(run, "train.max_steps=2", "train.save_every=0")
    assert (f"warning: taking over the lock {lock} left by a launch that is gone (pid {os.getpid()} on "
            f"{socket.gethostname()})") in r.stdout
    assert not lock.exists() and (run / "merged").is_dir()


def test_two_launches_at_once_into_one_folder_one_runs(tmp_path):
    run = tmp_path / "race"
    procs = [subprocess.Popen(train_cmd(run, "train.max_steps=3", "train.save_every=0"), cwd=ROOT, env=train_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [o[1][-1500:] for o in outs]
    err = outs[codes.index(2)][1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output.dir"), err
    assert any(m in err[0] for m in ("in use by another launch", "already holds a run", "changed while"))
    assert len(losses(run)) == 3 and not (run / "run.lock").exists()


def test_a_bad_document_found_while_packing_leaves_no_run_folder(tmp_path):
    bad = tmp_path / "book.txt.gz"
    bad.write_bytes(gzip.compress(b"It was a bright cold day in April. " * 400)[:60])  # a truncated download
    run = tmp_path / "run"
    r = train(run, f"data.sources=[{{kind: files, path: '{bad}'}}]", check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and f"cannot read {bad}" in errors[0], r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == errors[0]  # the last word, after the packing's progress lines
    assert "Traceback" not in r.stderr and not run.exists()


def _file_size_limit(limit: int):
    """A child's RLIMIT_FSIZE: a write past ``limit`` bytes fails with EFBIG (Python ignores SIGXFSZ), as a write
    to a full disk fails with ENOSPC: the same error path, without filling this machine's disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _limited(run: Path, limit: int, *sets: str) -> tuple[int, list[str]]:
    r = subprocess.run(train_cmd(run, *sets, resume="auto"), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                       timeout=600, preexec_fn=_file_size_limit(limit))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.returncode, errors


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_space_needed(tmp_path):
    from training.checkpoint import checkpoint_problem

    sets = ("train.save_every=2", "wandb.enabled=false")
    run = tmp_path / "disk"
    ckpts = run / "checkpoints"
    train(run, *sets, "train.max_steps=2")  # step-2 and an export, without a limit
    biggest = max(f.stat().st_size for f in (ckpts / "step-000002").rglob("*") if f.is_file())
    merged = (run / "merged" / "model.safetensors").stat().st_size
    assert biggest < merged  # cpu_tiny: the optimizer states are smaller than the merged fp32 weights

    # the step-4 checkpoint cannot be written: its biggest file is over the limit
    code, errors = _limited(run, biggest // 2, *sets, "train.max_steps=4")
    assert code == 2 and f"could not write {ckpts / 'step-000004'}" in errors[0]
    assert re.search(r"[0-9.]+ MiB free on its disk, about 0\.[1-9] MiB needed", errors[0]), errors[0]
    assert f"the previous checkpoint {ckpts / 'step-000002'} is complete" in errors[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # the partial one removed
    assert checkpoint_problem(ckpts / "step-000002") is None

    # the checkpoint fits but the merged weights do not: the export fails, the checkpoint stays
    code, errors = _limited(run, (biggest + merged) // 2, *sets, "train.max_steps=4")
    assert code == 2 and f"could not write {run / 'merged'}" in errors[0]
    assert f"the last checkpoint {ckpts / 'step-000004'} is complete" in errors[0]
    assert not list(run.glob(".tmp-*")) and checkpoint_problem(ckpts / "step-000004") is None

    # with space again, --resume auto finishes the run from there
    train(run, *sets, "train.max_steps=4", resume="auto")
    assert len(losses(run)) == 4 and (run / "merged" / "model.safetensors").stat().st_mtime > \
        (ckpts / "step-000004").stat().st_mtime


_PLAIN_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert not any(m.split('.')[0] in ('ropescale', 'data', 'eval', 'train', 'configs') for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(model.config.rope_parameters['rope_type'], model.config.rope_parameters['factor'])
"""


def test_merged_export_reloads_in_plain_transformers_with_the_scaling(tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig

    from models.load import load_model

    run = tmp_path / "export"
    train(run)
    # The fine-tuned model, unmerged: the RoPE-scaled base + LoRA adapter + trainable extras.
    base_config = AutoConfig.from_pretrained(run / "adapter" / "base_config")
    model = load_model("tiny-llama", config=base_config, seed=0)
    model = PeftModel.from_pretrained(model, run / "adapter").eval()
    extras = load_file(run / "adapter" / "trainable_extra.safetensors")
    missing = [k for k in extras if k not in dict(model.named_parameters())]
    assert not missing
    with torch.no_grad():
        for k, v in extras.items():
            model.get_parameter(k).copy_(v)
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))  # 2x the native 256
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([PY, "-c", _PLAIN_RELOAD, str(run / "merged"), str(tmp_path / "ids.pt"),
                        str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, env=train_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["yarn", "2.0"]
    with torch.no_grad():
        ours = model(ids).logits
    plain = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(ours, plain, atol=1e-4), (ours - plain).abs().max()


def test_wandb_offline_run_and_no_secret_in_the_run_folder_or_the_logs(tmp_path):
    key = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key; set but never written
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # the shape of a hub token; likewise
    run = tmp_path / "wb"
    r = train(run, "wandb.mode=offline", WANDB_API_KEY=key, HF_TOKEN=token, HUGGING_FACE_HUB_TOKEN=token)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    assert b"tokens_per_s" in offline[0].read_bytes()  # the logged metrics are in the run file
    for secret in (key, token):
        leaks = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks and secret not in r.stdout + r.stderr


def _torch_extensions_dir() -> str:
    """Where torch keeps compiled extensions for this process (its default: the build root, then pyXY_<device>)."""
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return str(Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{device}")


def test_wandb_mode_auto_is_offline_without_a_key(tmp_path):
    run = tmp_path / "auto"
    # no key in the environment, no ~/.netrc; DeepSpeed's compiled CPU ops stay where they were built (a new HOME
    # would move torch's extension folder and rebuild them: 40 s)
    r = train(run, "train.max_steps=2", HOME=str(tmp_path), TORCH_EXTENSIONS_DIR=_torch_extensions_dir())
    assert "wandb: offline (no API key configured)" in r.stdout
    assert list((run / "wandb").glob("offline-run-*"))


def test_run_folder_is_protected_and_resume_checks_the_config(tmp_path):
    run = tmp_path / "guard"
    train(run, "train.max_steps=2")
    r = train(run, "train.max_steps=2", check=False)
    assert r.returncode != 0 and "already holds a run; pass --resume auto" in r.stderr
    r = train(run, "train.max_steps=4", "train.lr=0.1", resume="auto", check=False)
    assert r.returncode != 0 and "config differs" in r.stderr and "train.lr" in r.stderr
    train(run, "train.max_steps=4", resume="auto")  # a longer run of the same config continues
    assert len(losses(run)) == 4


@pytest.mark.parametrize("sets,message", [
    (("data.seq_len=128",), "data.seq_len 128 is below the model's original context 256"),
    (("rope.method=yarm",), "unknown RoPE method 'yarm'"),
    (("train.max_step=3",), "did you mean 'train.max_steps'?"),
    (("model.name=./no/such/model",), "model folder not found"),
    (("deepspeed.config=configs/deepspeed/zero9.json",), "zero9.json not found"),
    # an integer at its boundary: 0 rows per forward used to pass the schema and fail after the rendezvous
    (("train.micro_batch_size=0",), "train.micro_batch_size: Input should be greater than or equal to 1"),
    # what a model family cannot do (models/families.py), refused in the preflight, never after the rendezvous
    (("model.name=tiny-gemma2", "model.attn_implementation=sdpa"), "gemma2 runs only eager, flash_attention_2"),
    (("model.name=tiny-phi3", "rope.method=dynamic_ntk"), "recomputes its table from the current length"),
    (("model.name=tiny-gemma3_text", "rope.method=dynamic_yarn"), "one RoPE per layer type"),
    (("rope.layer_types=[full_attention]",), "this model has one RoPE for all its layers"),
    (("model.name=tiny-gpt_neox", "lora.target_modules=[q_proj]"), "is named 'q_proj'"),
    (("model.name=tiny-gpt_neox", "lora.trainable_extra=[embed_tokens]"), "name ends with 'embed_tokens'; did you mean 'embed_in'"),
])
def test_bad_config_exits_with_one_line(tmp_path, capsys, sets, message):
    """Every refusal happens before DeepSpeed starts and before the run folder is written."""
    run = tmp_path / "bad"
    proc = subprocess.run(train_cmd(run, *sets), cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


def _attention_calls_in_backward(keep: bool) -> tuple[int, dict[str, torch.Tensor], int]:
    """Build train.py's model for cpu_tiny (checkpointing on, keep_attention as given), run one loss forward and
    count the fused attention kernels the backward runs; returns (count, LoRA/extra gradients, layers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from configs.schema import load_run_config
    from training.model import LossModule, attention_ops, model_config, trainable_model

    cfg = load_run_config(ROOT / "configs/cpu_tiny.yaml", [f"train.checkpoint_keep_attention={str(keep).lower()}"])
    torch.manual_seed(0)  # the same LoRA initialization and dropout masks in both builds
    model = trainable_model(cfg, model_config(cfg), "fp32", "sdpa")
    module = LossModule.of(cfg, model, "fp32").train()
    ids = torch.randint(0, 260, (1, 512), generator=torch.Generator().manual_seed(0))
    loss = module(ids, ids, torch.arange(512)[None])
    kernels = set(attention_ops())

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func in kernels
            return func(*args, **(kwargs or {}))

    with Count():
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return Count.calls, grads, model.config.num_hidden_layers


def test_checkpointing_keeps_attention_outputs_and_the_gradients_do_not_change():
    kept, grads_kept, layers = _attention_calls_in_backward(True)
    recomputed, grads_full, _ = _attention_calls_in_backward(False)
    assert (kept, recomputed) == (0, layers)  # full checkpointing reruns every layer's attention forward
    assert grads_kept.keys() == grads_full.keys()
    for name, g in grads_kept.items():
        torch.testing.assert_close(g, grads_full[name], rtol=0, atol=1e-6)


def test_auto_precision_follows_onednn_isa_cap(monkeypatch):
    from training.runtime import choose_precision, cpu_bf16_units
    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    units = cpu_bf16_units()
    assert choose_precision("auto", cpu)[0] == ("bf16" if units else "fp32")
    # below AVX512_CORE_BF16 oneDNN emulates bf16: auto must not pick it, whatever the CPU has
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert cpu_bf16_units() == []
    precision, reason = choose_precision("auto", cpu)
    assert precision == "fp32" and "ONEDNN_MAX_CPU_ISA=avx2 hides them" in reason
    assert choose_precision("bf16", cpu)[0] == "bf16"  # an explicit setting is kept
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu_bf16_units() == [u for u in units if u == "avx512_bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16_units() == units
