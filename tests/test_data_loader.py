"""Row order: seeded, disjoint per rank, resumable in a new process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig, DataError, SourceSpec
from data.corpus import load_corpus
from data.loader import PackedLoader
from data.pack import build_packed
from models.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    text = load_corpus("heldout")[0].text[:20_500]  # real text: rows are distinct
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": text[i : i + 700]}) + "\n"
                                            for i in range(0, len(text), 700)))
    return DataConfig(sources=[SourceSpec(kind="files", path=str(tmp / "docs.jsonl"))], seq_len=64, mode="reset",
                      cache_dir=str(tmp / "cache"))


@pytest.fixture(scope="module")
def ds(cfg):
    ds = build_packed(cfg, load_tokenizer("tiny-llama"))
    rows = {bytes(np.asarray(r)) for r in ds.arrays["input_ids"]}
    assert len(rows) == len(ds) and len(ds) % 6 != 0  # distinct rows; epochs do not end on a step boundary
    return ds


def row_index(ds):
    return {bytes(np.asarray(r)): i for i, r in enumerate(ds.arrays["input_ids"])}


def ids_of(ds, batch):
    index = row_index(ds)
    return [index[bytes(r.numpy().astype(np.int32))] for r in batch["input_ids"]]


def take(loader, k):
    return [next(iter(loader)) for _ in range(k)]


def test_resume_in_a_new_process(cfg, ds, tmp_path):
    batch, more = 4, 5
    k = len(ds) // batch - 2  # the resumed batches run across the epoch boundary
    straight = PackedLoader(ds, batch, seed=5)
    expected = take(straight, k + more)[k:]
    first = PackedLoader(ds, batch, seed=5)
    take(first, k)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first.state_dict()))
    out = tmp_path / "resumed.pt"
    script = (
        "import json, sys, torch\n"
        "from data.config import DataConfig\nfrom data.loader import PackedLoader\nfrom data.pack import build_packed\n"
        "from models.load import load_tokenizer\n"
        f"cfg = DataConfig.model_validate_json({cfg.model_dump_json()!r})\n"
        "ds = build_packed(cfg, load_tokenizer('tiny-llama'))\n"
        f"loader = PackedLoader(ds, {batch}, seed=5)\n"
        f"loader.load_state_dict(json.loads(open({str(state)!r}).read()))\n"
        f"torch.save([next(iter(loader)) for _ in range({more})], {str(out)!r})\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reusing cached packed set" in proc.stderr
    resumed = torch.load(out, weights_only=True)
    for a, b in zip(resumed, expected, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "labels", "position_ids"))


def test_two_ranks_are_disjoint_and_cover_an_epoch(ds):
    batch, world = 3, 2
    loaders = [PackedLoader(ds, batch, rank=r, world_size=world, seed=1) for r in range(world)]
    steps = loaders[0].steps_per_epoch
    assert steps == -(-len(ds) // (batch * world))
    per_rank = [[ids_of(ds, b) for b in take(loader, steps)] for loader in loaders]
    # The global order of slots: step by step, rank 0's batch, then rank 1's. The first len(ds) slots are epoch 0.
    stream = [i for s in range(steps) for r in range(world) for i in per_rank[r][s]]
    epoch0 = stream[: len(ds)]
    assert sorted(epoch0) == list(range(len(ds)))  # every row exactly once over both ranks: disjoint, covering
    assert all(i in epoch0 for i in per_rank[1][0]) and all(i in epoch0 for i in per_rank[0][0])
    assert all(len(b) == batch for r in per_rank for b in r)  # same number of full batches on every rank


def test_order_depends_on_seed_and_not_on_world_size(ds):
    one = [ids_of(ds, b) for b in take(PackedLoader(ds, 4, seed=2), 5)]
    again = [ids_of(ds, b) for b in take(PackedLoader(ds, 4, seed=2), 5)]
    other = [ids_of(ds, b) for b in take(PackedLoader(ds, 4, seed=3), 5)]
    assert one == again and one != other
    ranks = [PackedLoader(ds, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    two = [ids_of(ds, next(iter(ranks[0]))) + ids_of(ds, next(iter(ranks[1]))) for _ in range(5)]
    assert two == one  # the global stream is the same; a resume may change the number of ranks


def test_state_of_another_packed_set_is_refused(ds):
    loader = PackedLoader(ds, 2, seed=0)
    state = loader.state_dict() | {"dataset_key": "reset-64-0000000000000000"}
    with pytest.raises(DataError, match="resume with the data config"):
        loader.load_state_dict(state)
    with pytest.raises(DataError, match="same seed"):
        loader.load_state_dict(loader.state_dict() | {"seed": 9})


def test_fewer_rows_than_one_step_is_refused(ds):
    PackedLoader(ds, batch_size=len(ds))  # exactly one step's worth is fine
    with pytest.raises(DataError, match=rf"has {len(ds)} rows, fewer than one step takes \(2 process\(es\) x "
                                        rf"train.micro_batch_size {len(ds)}\)"):
        PackedLoader(ds, batch_size=len(ds), world_size=2)
