"""Launching runs: sweeps over a grid of configs (``launch/sweep.py``), the per-GPU memory plan (``launch/memory.py``),
and the multi-node launch files (hostfile, SLURM, torchrun). Everything here calls the same entry points a user
would (``train.py``, ``python -m eval.*``)."""
