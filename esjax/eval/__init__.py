"""Evaluation: perplexity / bits per byte, multiple-choice and exact-match tasks from local JSONL
files, KV-cache generation, and a periodic in-training hook. See esjax/eval/README.md.

Modules: `tasks` (the JSONL format, n-shot prompts), `harness` (`evaluate`), `scoring`
(log-likelihoods), `perplexity`, `generation` and `sampling` (KV-cache decoding), `answers`
(GSM8K-style extraction), `hook` (`EvalHook`), `loading` (checkpoints), `export` (public
benchmarks to JSONL).
"""
