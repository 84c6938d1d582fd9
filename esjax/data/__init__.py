"""Text data: tokenizers, input formats (sources), preparing token shards once (prepare,
shards), the sampler (sampling), the deterministic resumable iterator with blends and
held-out validation documents (dataset), and per-process rows of a global batch (hosts)."""
