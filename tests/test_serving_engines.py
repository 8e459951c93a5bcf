"""Our exports in engines nobody here wrote, each in its own environment made from the registry (tests/engines.py):
transformers 4.57 loads the merged/ of short fine-tuning runs and gives transformers 5's logits at twice the native
length; llama.cpp (llama-cpp-python, compiled here from its source distribution) runs our GGUF of the testbed base
fine-tuned with YaRN and with linear, per-token log-probabilities at 2x and 4x the native length equal to
transformers 5's. The engines run in subprocesses started with ``-I`` from a scratch folder: they cannot import this
project. The first run builds the environments (llama.cpp: about 4 minutes on 2 cores; docs/serving.md)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.corpus import load_corpus
from launch.demo import native_length
from models.gguf_export import write_gguf
from models.load import load_config, load_model, load_tokenizer
from ropescale.apply import apply_rope
from ropescale.serving import write_serving_files
from tests.engines import engine_python
from tests.helpers import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "models" / "testbed"
L = 256  # the native context of the tiny presets
TESTBED_L = native_length(TESTBED)  # the testbed's native context, from its config.json

T4_SCRIPT = r"""
import json, sys, torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
report = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        save_file({"logits": model(ids).logits.contiguous()}, folder + "/t4.safetensors")
    report[folder] = {"rope_scaling": model.config.rope_scaling, "rope_theta": model.config.rope_theta}
assert not any(m.split(".")[0] in ("ropescale", "models", "training") for m in sys.modules), "project imported"
print(json.dumps(report))
"""

LLAMA_CPP_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(open(sys.argv[2]).read())
llm = Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True, n_threads=1,
            verbose=False)
llm.eval(ids)
scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
logp = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
out = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
meta = {k: v for k, v in llm.metadata.items() if "rope" in k}
llm.close()
print(json.dumps({"version": llama_cpp.__version__, "logp": out, "metadata": meta}))
"""


def engine(name: str, script: str, *args: str, cwd: Path) -> dict:
    """Run ``script`` with ``args`` in the ``name`` engine's Python; its last stdout line, parsed as JSON."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(engine_python(name)), "-I", "-c", script, *args], cwd=cwd, capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def book_ids(folder: Path, n: int) -> list[int]:
    """The first ``n`` tokens of the held-out book (data/corpus: a public-domain book the training split lacks)."""
    ids = load_tokenizer(str(folder))(load_corpus("heldout")[0].text[: 8 * n], add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def t5_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


# --- transformers 4.57 --------------------------------------------------------------------------------------------

FINE_TUNED = ("linear", "ntk_aware", "ntk_by_parts", "yarn")
TRAINING_FREE = {"llama3": {}, "dynamic_ntk": {}, "theta": {"rope_theta": 4e4},
                 "longrope": {"short_factor": [1.0 + 0.02 * i for i in range(16)],
                              "long_factor": [1.0 + 0.6 * i for i in range(16)]}}


@pytest.fixture(scope="module")
def t4(tmp_path_factory):
    """merged/ of a 3-step LoRA run per fine-tuned method (configs/cpu_tiny.yaml: tiny Llama, s = 2, 512 tokens),
    training-free exports of the other static and dynamic types, and a control whose rope_scaling was deleted; all
    reloaded in one transformers 4.57 process at 512 tokens (2x native)."""
    root = tmp_path_factory.mktemp("t4")
    folders = {}
    for method in FINE_TUNED:
        run = root / method
        train(run, f"rope.method={method}", "train.max_steps=3", "train.save_every=0")
        folders[method] = run / "merged"
    for method, params in TRAINING_FREE.items():
        config = apply_rope(load_config("tiny-llama"), method, 2.0, params)
        folders[method] = root / f"free-{method}"
        load_model("tiny-llama", config=config).save_pretrained(folders[method], safe_serialization=True)
        write_serving_files(folders[method], config)
    control = root / "control-yarn-no-rope_scaling"
    subprocess.run(["cp", "-r", str(folders["yarn"]), str(control)], check=True)
    raw = json.loads((control / "config.json").read_text())
    del raw["rope_scaling"]
    (control / "config.json").write_text(json.dumps(raw))
    folders["control"] = control
    ids = torch.tensor([book_ids(folders["yarn"], 2 * L)])
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    report = engine("transformers-4", T4_SCRIPT, str(root / "ids.safetensors"), *map(str, folders.values()), cwd=root)
    assert report["version"] == "4.57.1"
    return ids, folders, report


@pytest.mark.parametrize("method", [*FINE_TUNED, *TRAINING_FREE])
def test_transformers_4_reproduces_our_logits(t4, method):
    ids, folders, report = t4
    folder = folders[method]
    ours = t5_logits(folder, ids)
    theirs = load_file(str(folder / "t4.safetensors"))["logits"]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    saved = json.loads((folder / "config.json").read_text())
    assert report[str(folder)]["rope_scaling"] == saved.get("rope_scaling")
    if method in FINE_TUNED:
        assert (folder / "SERVING.md").is_file() and "transformers-4" in (folder / "SERVING.md").read_text()


def test_without_rope_scaling_transformers_4_serves_it_unscaled(t4):
    """The control: merged/ of the YaRN run with rope_scaling deleted (what train.py wrote before the serving
    export) loads in 4.57 as a plain model, and its logits at 2x leave ours by more than ten times the tolerance
    above (the tiny random model depends little on position: 2e-3 measured), so that check can fail."""
    ids, folders, report = t4
    assert report[str(folders["control"])]["rope_scaling"] is None
    theirs = load_file(str(folders["control"] / "t4.safetensors"))["logits"]
    assert (theirs - t5_logits(folders["yarn"], ids)).abs().max() > 1e-3


# --- llama.cpp ----------------------------------------------------------------------------------------------------


def compare(ours_logits: torch.Tensor, ids: list[int], theirs: list[float]) -> tuple[float, float, float]:
    """(mean |diff| of the per-token log-probabilities, our perplexity, llama.cpp's)."""
    logp = torch.log_softmax(ours_logits[0].double(), -1)
    ours = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    theirs = torch.tensor(theirs, dtype=torch.float64)
    return (ours - theirs).abs().mean().item(), math.exp(-ours.mean().item()), math.exp(-theirs.mean().item())


@pytest.fixture(scope="module")
def testbed_runs(tmp_path_factory):
    """The testbed base LoRA-fine-tuned 3 steps at s = 4 (rows of 4 x its native length) with YaRN and with
    linear; merged/ of each."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for method in ("yarn", "linear"):
        run = root / method
        train(run, f"model.name={TESTBED}", f"rope.method={method}", "rope.factor=4", f"data.seq_len={4 * TESTBED_L}",
              "train.micro_batch_size=1", "train.max_steps=3", "train.save_every=0")
        out[method] = run / "merged"
    return root, out


@pytest.mark.parametrize("method", ["yarn", "linear"])
@pytest.mark.parametrize("mult", [2, 4])
def test_llama_cpp_runs_the_fine_tuned_gguf_as_trained(testbed_runs, method, mult):
    root, merged = testbed_runs
    gguf = root / f"{method}.gguf"
    if not gguf.exists():
        write_gguf(merged[method], gguf)
    ids = book_ids(merged[method], mult * TESTBED_L)
    (root / "ids.json").write_text(json.dumps(ids))
    report = engine("llama.cpp", LLAMA_CPP_SCRIPT, str(gguf), str(root / "ids.json"), cwd=root)
    assert report["version"] == "0.3.36"
    assert report["metadata"]["llama.rope.scaling.type"] == method
    diff, ppl, their_ppl = compare(t5_logits(merged[method], torch.tensor([ids])), ids, report["logp"])
    print(f"llama.cpp {method} x{mult} ({mult * TESTBED_L} tokens): mean|dlogp| {diff:.2e}, ppl {ppl:.3f} vs "
          f"{their_ppl:.3f}")
    assert diff < 2e-3 and abs(their_ppl / ppl - 1) < 0.01


@pytest.mark.parametrize("method,params", [("ntk_by_parts", {}), ("llama3", {}), ("yarn", {"attention_factor": 0.8}),
                                           ("ntk_aware", {}),
                                           ("yarn", {"beta_fast": 16, "beta_slow": 2, "truncate": False})])
def test_llama_cpp_per_pair_table_and_attention_factor(tmp_path, method, params):
    """The testbed base, training-free at s = 4, at 4x its native length: NTK-by-parts and Llama 3 through a rope_freqs
    tensor, YaRN with its own attention factor through rope.scaling.attn_factor, NTK-aware as a base, YaRN with
    other betas through rope_freqs and attn_factor together."""
    config = apply_rope(load_config(str(TESTBED)), method, 4.0, params)
    folder = tmp_path / "model"
    load_model(str(TESTBED), config=config).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(str(TESTBED)).save_pretrained(folder)
    write_serving_files(folder, config)
    info = write_gguf(folder, tmp_path / "m.gguf")
    assert info["rope_freqs"] == (method in ("ntk_by_parts", "llama3") or "beta_fast" in params)
    ids = book_ids(folder, 4 * TESTBED_L)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    report = engine("llama.cpp", LLAMA_CPP_SCRIPT, str(tmp_path / "m.gguf"), str(tmp_path / "ids.json"),
                    cwd=tmp_path)
    diff, ppl, their_ppl = compare(t5_logits(folder, torch.tensor([ids])), ids, report["logp"])
    print(f"llama.cpp {method} {params} x4: mean|dlogp| {diff:.2e}, ppl {ppl:.3f} vs {their_ppl:.3f}")
    assert diff < 2e-3 and abs(their_ppl / ppl - 1) < 0.01
