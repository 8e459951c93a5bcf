"""Batches from a packed set: seeded order, disjoint per-rank shards, a position that a checkpoint saves.

The rows are read as one endless global stream: epoch e is a permutation of all rows drawn from ``(seed, e)``, and
epochs follow each other. Each optimizer step consumes ``world_size * batch_size`` consecutive slots of that stream;
rank r takes the r-th block of ``batch_size``. So ranks never share a row within an epoch, together they cover
every row, every rank runs the same number of steps (no row is dropped to even them out: the last step of an epoch
runs on into the next epoch's order), and the position is a single number, ``consumed_rows``, that does not depend
on the number of ranks. ``state_dict()`` after k batches + ``load_state_dict()`` in a new process continue with
batch k + 1 exactly.

``forward_kwargs(batch, block_cross_doc)`` gives the arguments for ``model(**kwargs)`` that make transformers treat
the rows the way the packing mode means (see its docstring).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data.config import DataError
from data.pack import PackedDataset


class PackedLoader:
    """Iterate batches ``{"input_ids", "labels", "position_ids"}`` (int64 tensors [batch_size, seq_len]) forever.

    Args:
        dataset: the packed set.
        batch_size: rows per batch on this rank (the micro-batch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: seed of the row order (epoch e uses the permutation drawn from ``(seed, e)``).
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                            f"rank={rank}, world_size={world_size}")
        if len(dataset) < world_size * batch_size:  # one step would hold the same row twice
            raise DataError(f"the packed set has {len(dataset)} rows, fewer than one step takes ({world_size} "
                            f"process(es) x train.micro_batch_size {batch_size}); add data or lower "
                            "train.micro_batch_size")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = (
            dataset, batch_size, rank, world_size, seed)
        self.consumed_rows = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps (batches per rank) that cover every row once: ceil(rows / (world_size * batch_size))."""
        return -(-len(self.dataset) // (self.world_size * self.batch_size))

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.consumed_rows // len(self.dataset)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self._perms[epoch]

    def slot_rows(self, slots: np.ndarray) -> np.ndarray:
        """Row indices of global stream slots."""
        n = len(self.dataset)
        return np.array([self._perm(int(s) // n)[int(s) % n] for s in slots], dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next batch; advances the position by one step of all ranks."""
        first = self.consumed_rows + self.rank * self.batch_size
        rows = self.slot_rows(np.arange(first, first + self.batch_size))
        self.consumed_rows += self.world_size * self.batch_size
        return self.dataset.rows(rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position to save with a checkpoint (JSON-serializable)."""
        return {"consumed_rows": self.consumed_rows, "seed": self.seed, "rows": len(self.dataset),
                "dataset_key": self.dataset.key}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The packed set and the seed must be the ones it was saved with; the
        number of ranks and the batch size may differ (the position counts rows, not steps)."""
        if state["dataset_key"] != self.dataset.key or state["rows"] != len(self.dataset):
            raise DataError(f"the saved data position belongs to packed set {state['dataset_key']} "
                            f"({state['rows']} rows), not {self.dataset.key} ({len(self.dataset)} rows); resume with "
                            "the data config the run started with")
        if state["seed"] != self.seed:
            raise DataError(f"the saved data position used seed {state['seed']}, this loader seed {self.seed}; "
                            "resume with the same seed")
        self.consumed_rows = int(state["consumed_rows"])


def forward_kwargs(batch: dict[str, torch.Tensor], block_cross_doc: bool) -> dict:
    """Keyword arguments for ``model(**kwargs)`` on a packed batch (labels left out: the loss is computed apart).

    transformers 5 (masking_utils: ``find_packed_sequence_indices``) reads a new sequence wherever
    ``position_ids[t] - position_ids[t-1] != 1`` and then builds a block-diagonal causal mask, for sdpa, eager and
    flex alike (flash-attention 2 uses the same position ids for its varlen kernels), but only when
    ``attention_mask`` is None and no cache is used. Hence:

    - ``block_cross_doc=True`` (``reset`` rows): attention_mask None and ``use_cache=False`` -> attention stays
      inside each document. With ``use_cache`` left at its default (True) documents would see each other silently.
    - otherwise (``concat``, ``pose``, ``reset`` without blocking): an all-ones attention_mask, which turns that
      detection off. This matters for ``pose``: its skipped positions would otherwise be read as document starts and
      the chunks of a row could not attend to each other. An all-ones mask costs nothing with sdpa (plain causal).

    Shapes: every tensor [B, seq_len]; ``position_ids`` is passed in every mode (it carries the RoPE positions).
    """
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    kwargs["attention_mask"] = None if block_cross_doc else torch.ones_like(batch["input_ids"])
    return kwargs
