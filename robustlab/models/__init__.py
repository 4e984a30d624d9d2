"""Models: architectures by name, the Normalize wrapper, checkpoints with model cards, loading.

Every model maps float NCHW images in [0, 1] to logits; normalization is its first layer.
"""

from robustlab.models import certified, resnet, segmentation, small, wideresnet  # noqa: F401  (register the architectures)
from robustlab.models.card import SOURCES, ModelCard
from robustlab.models.checkpoint import load_checkpoint, save_checkpoint
from robustlab.models.dual_bn import DualBatchNorm, bn_branch, convert_to_dual_bn, set_bn_branch
from robustlab.models.loading import LoadedModel, load_model
from robustlab.models.runtime import eval_mode, training_modules
from robustlab.models.normalize import Normalize
from robustlab.models.registry import MODELS, create_model, list_models, model_config, register_model

__all__ = [
    "MODELS",
    "DualBatchNorm",
    "LoadedModel",
    "ModelCard",
    "Normalize",
    "SOURCES",
    "bn_branch",
    "convert_to_dual_bn",
    "create_model",
    "eval_mode",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_config",
    "register_model",
    "save_checkpoint",
    "set_bn_branch",
    "training_modules",
]
