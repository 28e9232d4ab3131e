"""Fine-tuning LoRA/QLoRA adapters: from a checkpoint to a PEFT adapter.

`finetune` trains the `nnx.LoRAParam` adapters of a (4-bit) model on plain
text or chat/instruction data with bitsandbytes' 8-bit AdamW, writes
resumable checkpoints, metrics and a loss plot, and saves the adapter in
PEFT's format. The building blocks (`TrainConfig`, the data functions,
`causal_lm_loss`, `make_optimizer`, `train_step`, `evaluate`) are public
for custom loops. See docs/lora.md, "Fine-tuning".
"""

from jaxbnb._src.train.config import OPTIMIZERS as OPTIMIZERS
from jaxbnb._src.train.config import TrainConfig as TrainConfig
from jaxbnb._src.train.data import TokenizedData as TokenizedData
from jaxbnb._src.train.data import batch_arrays as batch_arrays
from jaxbnb._src.train.data import batch_indices as batch_indices
from jaxbnb._src.train.data import encode_records as encode_records
from jaxbnb._src.train.data import pack_texts as pack_texts
from jaxbnb._src.train.data import prepare_data as prepare_data
from jaxbnb._src.train.data import read_data as read_data
from jaxbnb._src.train.layerwise import layerwise_train_step as layerwise_train_step
from jaxbnb._src.train.layerwise import supports_layerwise as supports_layerwise
from jaxbnb._src.train.loop import FinetuneResult as FinetuneResult
from jaxbnb._src.train.loop import finetune as finetune
from jaxbnb._src.train.loop import plot_losses as plot_losses
from jaxbnb._src.train.loop import read_metrics as read_metrics
from jaxbnb._src.train.loss import causal_lm_loss as causal_lm_loss
from jaxbnb._src.train.loss import token_nll as token_nll
from jaxbnb._src.train.mesh import shard_for_training as shard_for_training
from jaxbnb._src.train.step import commit_to_device as commit_to_device
from jaxbnb._src.train.step import evaluate as evaluate
from jaxbnb._src.train.step import learning_rate_schedule as learning_rate_schedule
from jaxbnb._src.train.step import make_optimizer as make_optimizer
from jaxbnb._src.train.step import train_step as train_step

__all__ = [
    "OPTIMIZERS",
    "FinetuneResult",
    "TokenizedData",
    "TrainConfig",
    "batch_arrays",
    "batch_indices",
    "causal_lm_loss",
    "commit_to_device",
    "encode_records",
    "evaluate",
    "finetune",
    "layerwise_train_step",
    "learning_rate_schedule",
    "make_optimizer",
    "pack_texts",
    "plot_losses",
    "prepare_data",
    "read_data",
    "read_metrics",
    "shard_for_training",
    "supports_layerwise",
    "token_nll",
    "train_step",
]
