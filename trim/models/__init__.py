"""Model families assembled from trim.nn, and the factory that builds or converts them."""

from trim.models.base import TrimModel
from trim.models.config import (ModelConfig, SamConfig, SamDecoderConfig, SamEncoderConfig, SamTrimConfig, TextConfig,
                                TrimConfig, VisionConfig)
from trim.models.io import create_model, load_model, read_config, save_model
from trim.models.output import ModelOutput
from trim.models.pretrained import from_pretrained

__all__ = ["ModelConfig", "ModelOutput", "SamConfig", "SamDecoderConfig", "SamEncoderConfig", "SamTrimConfig",
           "TextConfig", "TrimConfig", "TrimModel", "VisionConfig", "create_model", "from_pretrained", "load_model", "read_config", "save_model"]
