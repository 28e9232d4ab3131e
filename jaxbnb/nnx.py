"""Flax NNX layers with bitsandbytes' quantized weights, and the linear factory."""

from jaxbnb._src.layers.linear4bit import Linear4bit as Linear4bit
from jaxbnb._src.layers.linear4bit import LinearFP4 as LinearFP4
from jaxbnb._src.layers.linear4bit import LinearNF4 as LinearNF4
from jaxbnb._src.layers.linear8bit import Linear8bitLt as Linear8bitLt
from jaxbnb._src.layers.common import QuantizedLinear as QuantizedLinear
from jaxbnb._src.layers.common import QuantizedWeight as QuantizedWeight
from jaxbnb._src.layers.factory import make_linear as make_linear
from jaxbnb._src.layers.factory import weight_format as weight_format
from jaxbnb._src.layers.linear import Linear as Linear
from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES as DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.quantize_model import memory_footprint as memory_footprint
from jaxbnb._src.layers.quantize_model import quantize_params as quantize_params
from jaxbnb._src.layers.embedding import Embedding as Embedding
from jaxbnb._src.layers.embedding import Embedding4bit as Embedding4bit
from jaxbnb._src.layers.embedding import Embedding8bit as Embedding8bit
from jaxbnb._src.layers.embedding import EmbeddingFP4 as EmbeddingFP4
from jaxbnb._src.layers.embedding import EmbeddingNF4 as EmbeddingNF4
from jaxbnb._src.layers.embedding import StableEmbedding as StableEmbedding
from jaxbnb._src.layers.embedding import quantize_embeddings as quantize_embeddings
from jaxbnb._src.layers.embedding import stable_embedding_override as stable_embedding_override

__all__ = [
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "StableEmbedding",
    "quantize_embeddings",
    "stable_embedding_override",
    "DEFAULT_SKIP_MODULES",
    "Linear",
    "Linear4bit",
    "Linear8bitLt",
    "LinearFP4",
    "LinearNF4",
    "QuantizedLinear",
    "QuantizedWeight",
    "make_linear",
    "memory_footprint",
    "quantize_params",
    "weight_format",
]
