"""Dense and MoE decoders in Flax NNX."""

from esjax.models.config import ModelConfig, count_params
from esjax.models.transformer import Transformer
