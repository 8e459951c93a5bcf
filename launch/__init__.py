"""Launching runs: sweeps over a grid of configs (``launch/sweep.py``), the memory plan's command
(``launch/memory.py``; the plan itself is ``training/memory.py``), the testbed and the demo, and the multi-node launch
files (hostfile, SLURM, torchrun). Everything here calls the same entry points a user would (``train.py``,
``python -m eval.*``)."""
