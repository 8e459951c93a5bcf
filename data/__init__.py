"""Text for long-context training and evaluation: the bundled corpus, sources, tokenization and packing.

This package knows tokenizers and text, never models.
"""
