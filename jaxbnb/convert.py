"""Checkpoints in and out: Hugging Face, bitsandbytes, GGUF and orbax.

`from_pretrained` reads a Hugging Face folder (safetensors, one file or
sharded; `.bin` through torch when installed), a bitsandbytes 4-bit
checkpoint (bit-exactly, no re-quantization) or a llama GGUF file, quantizing
tensor by tensor as it goes. `save_pretrained` writes bitsandbytes' format,
which transformers + bitsandbytes load. `save_checkpoint` /
`restore_checkpoint` use orbax. Savers write atomically and never into the
checkpoint a model was loaded from.

Reading GGUF files (`gguf`) and tokenizers (`transformers`, `tokenizers`,
`jinja2` for chat templates) needs the Hugging Face extra, `pip install
'jaxbnb[hf]'`; importing this module does not.
"""

from jaxbnb._src.io.checkpoint_source import CheckpointSource as CheckpointSource
from jaxbnb._src.io.checkpoint_source import open_checkpoint as open_checkpoint
from jaxbnb._src.io.convert import checkpoint_info as checkpoint_info
from jaxbnb._src.io.convert import from_pretrained as from_pretrained
from jaxbnb._src.io.convert import iter_checkpoint_tensors as iter_checkpoint_tensors
from jaxbnb._src.io.convert import save_pretrained as save_pretrained
from jaxbnb._src.io.gguf_source import GGUFSource as GGUFSource
from jaxbnb._src.io.gguf_source import smollm2_gguf_path as smollm2_gguf_path
from jaxbnb._src.io.orbax_io import restore_checkpoint as restore_checkpoint
from jaxbnb._src.io.orbax_io import save_checkpoint as save_checkpoint
from jaxbnb._src.io.sharding import ShardingRules as ShardingRules
from jaxbnb._src.io.sharding import parse_mesh as parse_mesh
from jaxbnb._src.io.tokenizer import load_tokenizer as load_tokenizer

__all__ = [
    "CheckpointSource",
    "GGUFSource",
    "ShardingRules",
    "checkpoint_info",
    "from_pretrained",
    "iter_checkpoint_tensors",
    "load_tokenizer",
    "open_checkpoint",
    "parse_mesh",
    "restore_checkpoint",
    "save_checkpoint",
    "save_pretrained",
    "smollm2_gguf_path",
]
