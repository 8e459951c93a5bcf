"""Where models come from and what runs on them, shared by training, eval, launch and bench.

``models.load``: a model by name (hub id, safetensors folder, ``.gguf``, ``smollm2-135m``, tiny presets): its
config, tokenizer and weights. ``models.build``: the config with ``model.arch`` overrides and a RoPE method applied,
and the model built from it (the recipe and eval build models the same way). ``models.loss``: the chunked
causal-LM loss that training, evaluation and the benchmarks all use. ``models/testbed/`` is data, not code: the
committed testbed base (safetensors, tokenizer, ``manifest.json``; launch/testbed.py builds and installs it).
"""
