"""Evaluation of long-context models: passkey retrieval and perplexity, for checkpoints or training-free methods."""
