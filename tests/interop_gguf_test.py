"""GGUF import (esjax/interop/gguf_file.py) on GGUF files the test writes with gguf's own
writer from a small random Llama, as llama.cpp's converter lays them out (q/k rows permuted,
tensor dims innermost first): esjax's logits against the same weights read from the Hugging
Face folder and against transformers' own GGUF loader, quantized tensors against the
originals, the tokenizer against the one it came from."""

import json
import os

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from esjax import interop  # noqa: E402
from esjax.interop import gguf_file  # noqa: E402
from esjax.models.config import ModelConfig  # noqa: E402
from esjax.train import state  # noqa: E402

CFG = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_seq_len=128, rope_theta=100000.0, tie_embeddings=True, norm_eps=1e-5,
                  init_std=0.1)
TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 20


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (transcribed)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(HF folder of a random Llama with a byte-level BPE tokenizer, its tensors)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  folder = tmp_path_factory.mktemp("hf")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=CFG.vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT], trainer)
  tok.save(str(folder / "tokenizer.json"))
  params = jax.tree.map(np.asarray, jax.jit(lambda: state.init_params(CFG, jax.random.key(3)))())
  interop.save_pretrained_params(CFG, params, folder)
  header = interop.SafetensorsFolder(folder)
  tensors = {name: np.array(header[name], np.float32) for name in header}
  return folder, tensors, tok


def write_gguf(path, tensors, tok, qtype=None):
  """A GGUF file of `tensors` (HF names) as llama.cpp writes one (F32, or `qtype` for the
  2-D weights)."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(CFG.n_layers)
  w.add_context_length(CFG.max_seq_len)
  w.add_embedding_length(CFG.d_model)
  w.add_feed_forward_length(CFG.d_ff)
  w.add_head_count(CFG.n_heads)
  w.add_head_count_kv(CFG.n_kv_heads)
  w.add_rope_freq_base(CFG.rope_theta)
  w.add_layer_norm_rms_eps(CFG.norm_eps)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  pad = [f"<|pad_{i}|>" for i in range(CFG.vocab_size - len(tokens))]  # to the embedding rows
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens + pad)
  w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens] + [5] * len(pad))
  merges = json.loads(tok.to_str())["model"]["merges"]
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
  w.add_eos_token_id(vocab["<|endoftext|>"])
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight"}
  inverse = {v: k for k, v in gguf_file._LAYER_NAMES.items()}  # pylint: disable=protected-access
  for name, t in tensors.items():
    if name.startswith("model.layers."):
      _, _, i, *rest = name.split(".")
      out = f"blk.{i}.{inverse['.'.join(rest[:-1])]}.{rest[-1]}"
    else:
      out = names[name]
    if name.endswith("q_proj.weight"):
      t = llama_cpp_permute(t, CFG.n_heads)
    elif name.endswith("k_proj.weight"):
      t = llama_cpp_permute(t, CFG.n_kv_heads)
    if qtype is not None and t.ndim == 2:
      q = gguf.quants.quantize(t, qtype)
      w.add_tensor(out, q, raw_shape=q.shape, raw_dtype=qtype)
    else:
      w.add_tensor(out, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def logits_of(folder, toks):
  out = interop.from_pretrained(folder, dtype="float32")(toks)
  return np.asarray(out[0] if isinstance(out, tuple) else out)


def test_a_float32_gguf_is_the_same_model(source, tmp_path):
  folder, tensors, tok = source
  path = write_gguf(tmp_path / "m.gguf", tensors, tok)
  assert gguf_file.is_gguf(path) and not gguf_file.is_gguf(folder / "config.json")
  out = gguf_file.to_hf_folder(path, tmp_path / "from_gguf")
  # The same model (GGUF carries no training init scale).
  assert interop.read_config(out) == interop.read_config(folder).replace(init_std=0.02)
  got = interop.SafetensorsFolder(out)
  for name, t in tensors.items():
    np.testing.assert_array_equal(np.asarray(got[name]), t, err_msg=name)
  toks = jax.numpy.asarray([tok.encode(TEXT[:80]).ids])
  np.testing.assert_allclose(logits_of(out, toks), logits_of(folder, toks), rtol=1e-6,
                             atol=1e-6)


def test_transformers_reads_the_gguf_file_as_esjax_does(source, tmp_path):
  """transformers' own GGUF reading (its config mapping and q/k un-permutation,
  `load_gguf_checkpoint`, as `from_pretrained(gguf_file=...)` uses it) is the reference."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  folder, tensors, tok = source
  path = write_gguf(tmp_path / "m.gguf", tensors, tok)
  config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref)["tensors"]
  missing, unexpected = ref.load_state_dict(state, strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the embedding
  ids = tok.encode(TEXT[:80]).ids
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits.numpy()
  got = logits_of(gguf_file.to_hf_folder(path, tmp_path / "from_gguf"),
                  jax.numpy.asarray([ids]))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_tensors_are_dequantized(source, tmp_path, qtype):
  """Each tensor within its format's step of the original (a block's scale / levels)."""
  folder, tensors, tok = source
  kind = gguf.GGMLQuantizationType[qtype]
  path = write_gguf(tmp_path / "q.gguf", tensors, tok, qtype=kind)
  got = interop.SafetensorsFolder(gguf_file.to_hf_folder(path, tmp_path / "q"))
  levels = {"Q8_0": 127, "Q4_0": 8, "Q4_1": 15}[qtype]
  for name, t in tensors.items():
    if t.ndim != 2:
      continue
    blocks = np.abs(t).reshape(t.shape[0], -1, 32).max(axis=2, keepdims=True)
    step = np.broadcast_to(blocks / levels * 2.0, (*blocks.shape[:2], 32)).reshape(t.shape)
    assert (np.abs(np.asarray(got[name]) - t) <= step + 1e-7).all(), name
    assert not np.array_equal(np.asarray(got[name]), t)  # really quantized


def test_the_tokenizer_converts(source, tmp_path):
  from esjax.data import tokenizer as tokenizer_lib
  folder, tensors, tok = source
  out = gguf_file.to_hf_folder(write_gguf(tmp_path / "m.gguf", tensors, tok), tmp_path / "t")
  mine = tokenizer_lib.load_tokenizer(os.path.join(out, "tokenizer.json"))
  for text in (TEXT[:200], "return fibonacci(42)  # <|endoftext|>", "naïve ünïcode ✓"):
    assert list(mine.encode_batch([text])[0]) == tok.encode(text).ids, text


def test_bad_files_are_one_line(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + b"\0" * 20)
  with pytest.raises(ValueError, match=r"bad.gguf: not a readable GGUF file"):
    gguf_file.to_hf_folder(bad, tmp_path / "out")
  other = tmp_path / "other.gguf"
  w = gguf.GGUFWriter(str(other), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2': only 'llama'"):
    gguf_file.to_hf_folder(other, tmp_path / "out2")


def test_convert_and_init_from_read_a_gguf_file(source, tmp_path):
  """`esjax.convert --src=m.gguf` writes the Hugging Face folder; `checkpoint.init_from=
  m.gguf` starts a run from the same parameters as from the folder it came from."""
  from esjax import convert
  from esjax.configs import common
  from esjax.sharding.layout import Layout
  from esjax.sharding.plan import make_plan
  from esjax.train import init_from
  folder, tensors, tok = source
  path = write_gguf(tmp_path / "m.gguf", tensors, tok)
  written = convert.convert(path, str(tmp_path / "out"))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(written)
  plan = make_plan(Layout(dp=2, tp=2), jax.devices()[:4])
  loaded = {}
  for name, src in (("gguf", path), ("hf", str(folder))):
    config = common.base_config()
    config.checkpoint.init_from = src
    loaded[name] = init_from.load(config, CFG, plan)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               loaded["gguf"], loaded["hf"])


def test_without_the_gguf_package_it_is_one_line(source, tmp_path, monkeypatch):
  import sys
  folder, tensors, tok = source
  path = write_gguf(tmp_path / "m.gguf", tensors, tok)
  monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` then raises ImportError
  with pytest.raises(ValueError, match=r"reading a GGUF file needs the gguf package, which is "
                                       r"not installed: pip install -r requirements-optional"):
    gguf_file.to_hf_folder(path, tmp_path / "out")
