"""Hugging Face interop: local safetensors folders of Llama, Mistral, Qwen2, Qwen3, Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE."""

from esjax.interop.hf import (from_pretrained, load_pretrained_params, model_from_params,
                              read_config, save_pretrained, save_pretrained_params)
from esjax.interop.hf_config import architecture_for, config_from_hf, config_to_hf
from esjax.interop.hf_params import (abstract_params, esjax_to_hf_tensors, hf_to_esjax_params,
                                     iter_hf_tensors)
from esjax.interop.load import host_plan, is_hf_folder, read_params
from esjax.interop.safetensors_io import SafetensorsFolder, write_safetensors
