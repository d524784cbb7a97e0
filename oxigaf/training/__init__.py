"""Training and fine-tuning the multi-view UNet (ImageDream's objective) on multi-view data.

``MultiViewDataset`` reads subjects in the format ``MultiViewOutput.save()`` writes;
``Trainer`` / ``TrainConfig`` (or ``train``) run the loop on any backend and write a pipeline
folder ``Pipeline.from_pretrained`` loads. The core builds every batch in numpy; a backend's
``unet_trainer`` does the loss, gradients and AdamW step (backends/*/training.py).
"""

from .data import NORMAL_KEY, MultiViewDataset, relative_camera_vectors
from .loop import TrainConfig, Trainer, train
from .lora import LoRA, load_lora
from .objective import Batch, batch_loss, build_batch

__all__ = ["NORMAL_KEY", "Batch", "LoRA", "MultiViewDataset", "TrainConfig", "Trainer", "batch_loss", "build_batch",
           "load_lora", "relative_camera_vectors", "train"]
