"""Training: one loop; objectives (standard now, adversarial recipes later) plug into it."""

from robustlab.training.loop import TrainConfig, accuracy, train

__all__ = ["TrainConfig", "accuracy", "train"]
