"""The library under the recipe: every building block ``train.py`` composes, public and documented, also called by
launch/, bench/ and the tests (nothing imports ``train.py``).

- ``runtime``: this process's device, the process group, precision and attention-kernel choice, SIGTERM, faults;
- ``model``: the model config with the RoPE method, the trainable model (LoRA, extras, checkpointing), the loss module;
- ``engine``: the DeepSpeed config and engine, the LR schedule, one optimizer step;
- ``checkpoint``: the run folder, checkpoints (save and load side by side), the exported adapter and merged model;
- ``metrics``: metrics.jsonl, the progress bar, W&B;
- ``memory``: the per-GPU memory plan (``train.py --dry-run``, ``python -m launch.memory``);
- ``evaluate``: the in-run evaluation of the merged model.

The only package that knows optimizers, DeepSpeed and W&B together.
"""
