"""GGUF (llama.cpp's format) -> a Hugging Face folder that the rest of esjax/interop reads.

    python -m esjax.convert --src=model.gguf --dst=DIR   # -> a Hugging Face folder
    --config.checkpoint.init_from=model.gguf             # a run starts from it

Llama-architecture files (`general.architecture` "llama": Llama, SmolLM2, TinyLlama, ...):

- tensors are dequantized with `gguf`'s numpy dequantizer (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
  Q5_0, Q5_1, the K-quants, ...: whatever `gguf.quants.dequantize` covers) to float32;
- llama.cpp's converter permutes the rows of q and k for its rotary layout (pairs of a head's
  rows interleaved); the permutation is undone here;
- the config comes from the metadata (`llama.*`: depth, widths, heads, RoPE base, norm eps,
  context); no `output.weight` means tied embeddings;
- the tokenizer (`tokenizer.ggml.*`, the byte-level BPE kind "gpt2") is written as a
  `tokenizer.json` with its special tokens, so esjax.data.tokenizer and transformers read it.

The whole model is dequantized on the host once, into `<dst>/model.safetensors` (float32), and
read from there as any Hugging Face folder (each device its own shards): init_from converts
into a temporary folder, esjax.convert into DIR, which eval, generate and init_from then
read. `gguf` is optional (requirements-optional.txt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from esjax.interop import safetensors_io

MAGIC = b"GGUF"
_LAYER_NAMES = {  # GGUF tensor (blk.{i}.NAME.weight) -> Hugging Face Llama tensor
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def is_gguf(path: str | os.PathLike) -> bool:
  path = Path(path).expanduser()
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("reading a GGUF file needs the gguf package, which is not installed: "
                     "pip install -r requirements-optional.txt") from None
  return gguf


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of llama.cpp's q/k row permutation: its rows [h, 2, half] (pairs of halves)
  were written as [h, half, 2]."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _meta(reader: Any) -> dict[str, Any]:
  """The metadata as Python values; float32 numbers as the decimals they were written from
  (1e-05, not 9.99999974e-06)."""
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("GGUF."):
      continue
    value = field.contents()
    if isinstance(value, float) and field.types and field.types[-1] == 6:  # FLOAT32
      value = float(str(np.float32(value)))
    out[name] = value
  return out


def hf_config(meta: dict[str, Any], tied: bool, vocab: int) -> dict[str, Any]:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r}: only 'llama' files are supported")
  get = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
  missing = [k for k in ("block_count", "embedding_length", "feed_forward_length",
                         "attention.head_count") if get(k) is None]
  if missing:
    raise ValueError(f"GGUF metadata lacks llama.{', llama.'.join(missing)}")
  heads = int(get("attention.head_count"))
  d_model = int(get("embedding_length"))
  head_dim = int(get("rope.dimension_count", d_model // heads))
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab, "hidden_size": d_model,
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": head_dim, "hidden_act": "silu",
      "max_position_embeddings": int(get("context_length", 2048)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "torch_dtype": "float32"}


def _tensors(reader: Any, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  gguf = _gguf()
  out = {}
  for t in reader.tensors:
    parts = t.name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
      name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    elif len(parts) == 2 and parts[0] in _TOP_NAMES:
      name = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    elif t.name == "rope_freqs.weight":
      raise ValueError("GGUF tensor rope_freqs.weight (Llama 3.1 RoPE scaling) is not supported")
    else:
      raise ValueError(f"GGUF tensor {t.name!r} has no Llama counterpart")
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
    heads = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}.get(parts[-2])
    if heads:  # llama.cpp's rotary row order
      w = unpermute(w, cfg[heads])
    out[name] = w
  return out


def _tokenizer_json(meta: dict[str, Any]) -> str:
  """The GGUF file's byte-level BPE tokenizer as a Hugging Face tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') "
                     "tokenizers convert")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if meta.get("tokenizer.ggml.pre") == "smollm":  # digits one by one, then GPT-2's split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])  # CONTROL
  return tok.to_str()


def to_hf_folder(path: str | os.PathLike, out: str | os.PathLike) -> str:
  """Writes `path` (a GGUF file) as a Hugging Face folder `out`; returns `out`."""
  gguf = _gguf()
  try:
    reader = gguf.GGUFReader(str(path))
  except (ValueError, OSError, IndexError) as e:
    raise ValueError(f"{path}: not a readable GGUF file ({str(e)[:100]})") from None
  meta = _meta(reader)
  names = {t.name for t in reader.tensors}
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise ValueError(f"{path}: no token_embd.weight tensor")
  cfg = hf_config(meta, tied="output.weight" not in names, vocab=int(embd.shape[-1]))
  tensors = _tensors(reader, cfg)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  specs = [(name, w.shape, w.dtype) for name, w in tensors.items()]
  safetensors_io.write_safetensors(specs, list(tensors.values()), out, max_shard_bytes=2**40)
  (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
  if "tokenizer.ggml.tokens" in meta:
    (out / "tokenizer.json").write_text(_tokenizer_json(meta), encoding="utf-8")
  return str(out)
