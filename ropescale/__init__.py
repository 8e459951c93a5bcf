"""ropescale: the RoPE context-extension methods (``methods``: one registry entry per method, its math, validator,
defaults and how it is written to and read from ``config.rope_parameters``), applying them to a Hugging Face config
(``apply``), the per-dimension view (``inspect``) and dynamic YaRN at run time (``runtime``).

Pure RoPE math and config handling: it imports no project package but ``utils``. ``python -m ropescale`` is the
command-line entry point (``__main__.py``), which may load models.
"""
