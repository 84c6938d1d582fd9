"""Text data: tokenizers, text sources (the default corpus or the user's files), and the
deterministic, resumable batch iterator the training loop checkpoints."""
