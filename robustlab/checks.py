"""Input validation shared by attacks, evaluation and training: one clear message per problem."""

from __future__ import annotations

import torch

from robustlab.errors import RobustlabError


def check_images(x: object, what: str = "images") -> torch.Tensor:
    """Images must be a float tensor (N, C, H, W), finite, with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise RobustlabError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise RobustlabError(f"{what} must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise RobustlabError(f"{what} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise RobustlabError(f"{what} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
        raise RobustlabError(f"{what} contain NaN or infinite values ({bad} of {x.shape[0]} images)")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise RobustlabError(
            f"{what} must have values in [0, 1] (found {lo:.4g}..{hi:.4g}); put normalization inside "
            "the model (robustlab.models.Normalize) instead of normalizing the data"
        )
    return x


def check_labels(y: object, n: int, num_classes: int | None = None, what: str = "labels") -> torch.Tensor:
    """Labels must be an integer tensor (N,) with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise RobustlabError(f"{what} must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise RobustlabError(f"{what} must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise RobustlabError(f"{what} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if n and int(y.min()) < 0:
        raise RobustlabError(f"{what} must be >= 0, found {int(y.min())}")
    if num_classes is not None and n and int(y.max()) >= num_classes:
        raise RobustlabError(
            f"{what} must be below the number of classes ({num_classes}), found {int(y.max())}"
        )
    return y.long()


#: The one line for a segmentation model given where a classifier is expected, and the reverse.
SEGMENTATION_AS_CLASSIFIER = ("the model returns per-pixel logits of shape {shape} (N, classes, H, W): it is a "
                              "segmentation model and cannot be evaluated as a classifier; use `robustlab eval` (it "
                              "picks the segmentation protocol) or robustlab.eval.protocols.SegmentationProtocol")
CLASSIFIER_AS_SEGMENTATION = ("the model returns one prediction per image, logits of shape {shape} (N, classes): it "
                              "is a classifier and cannot be evaluated as a segmentation model, which needs "
                              "per-pixel logits (N, classes, H, W)")


def check_logits(out: object, n: int, num_classes: int | None = None, dense: bool | None = False) -> torch.Tensor:
    """A model must map N images to an (N, classes) float tensor of logits; with ``dense`` (a
    segmentation model) to per-pixel logits (N, classes, H, W); ``dense=None`` takes either."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        raise RobustlabError(
            f"the model returned a {type(out).__name__}; it must return one (N, classes) tensor of logits"
        )
    if not isinstance(out, torch.Tensor):
        raise RobustlabError(f"the model must return a tensor of logits, got {type(out).__name__}")
    if dense is None:
        dense = out.dim() == 4
    if out.dim() == 4 and not dense and out.shape[0] == n:
        raise RobustlabError(SEGMENTATION_AS_CLASSIFIER.format(shape=tuple(out.shape)))
    if dense:
        if out.dim() == 2 and out.shape[0] == n:
            raise RobustlabError(CLASSIFIER_AS_SEGMENTATION.format(shape=tuple(out.shape)))
        if out.dim() != 4 or out.shape[0] != n:
            raise RobustlabError(f"a segmentation model must return per-pixel logits of shape (N, classes, H, W) with "
                                 f"N = {n}, got {tuple(out.shape)}")
    elif out.dim() != 2 or out.shape[0] != n:
        raise RobustlabError(
            f"the model must return logits of shape (N, classes) = ({n}, K), got {tuple(out.shape)}"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise RobustlabError(
            f"the model returns {out.shape[1]} classes but the data has {num_classes}"
        )
    if out.shape[1] < 2:
        raise RobustlabError(f"the model must return at least 2 class logits, got {out.shape[1]}")
    return out
