"""ropescale: RoPE context-extension methods, applying them to Hugging Face configs, and model loading.

The library half of the project: it imports nothing from ``train``, ``data`` or ``eval``.
"""
