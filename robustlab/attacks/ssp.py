"""SSP, the self-supervised perturbation (Naseer et al. 2020, "A self-supervised approach for
adversarial robustness"): a label-free attack that pushes the features of a chosen layer of a
feature network as far as possible from the clean image's features.

The objective is the per-sample mean squared distance between the layer's outputs on the perturbed
and on the clean image, maximized by projected steepest ascent (sign steps for Linf, normalized steps
for L2) from a random start in the ball (at the clean image the distance is at its minimum and its
gradient is zero). Labels are ignored: success means the target model's prediction on ``x_adv``
differs from its prediction on ``x``.

:func:`perturb_folder` runs any attack over a folder of unlabelled images and writes the perturbed
images as PNG files with the same names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, eot_gradient, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode, fast_runtime
from robustlab.progress import progress as show_progress


class _LayerReached(Exception):
    """Raised by the forward hook to stop the feature network once the layer's output is known."""


class FeatureExtractor(nn.Module):
    """The output of the submodule called ``layer`` (a name from ``model.named_modules()``) when
    ``model`` runs on the input; the rest of the network is skipped. ``layer=None``: the model's
    output."""

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        if layer is not None:
            modules = dict(model.named_modules())
            if layer not in modules or layer == "":
                names = [n for n in modules if n]
                shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
                raise RobustlabError(f"the feature network has no layer {layer!r}; its layers: {shown}")
            self._module = modules[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.model(x)
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _LayerReached

        handle = self._module.register_forward_hook(hook)
        try:
            self.model(x)
        except _LayerReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RobustlabError(f"layer {self.layer!r} was not used in the feature network's forward pass")
        return captured[0]


@register_attack
class SSP(Attack):
    """Self-supervised perturbation: maximize the feature distortion of ``layer``.

    layer: a module name of the feature network (``model.named_modules()``; None: its output);
    feature_model: model spec of the feature network (:func:`robustlab.models.load_model`; None: the
    attacked model itself); steps: iterations; alpha: step size in the threat model's norm (default
    ``2.5 * eps / steps``); random_start: start at a random point of the ball (needed: the gradient is
    zero at the clean image); eot: gradient draws averaged per step (for randomized feature networks).

    Costs: ``gradients`` are input gradients of the feature network (the attacked model's when it is
    the feature network); ``forwards`` add one forward of the target on ``x`` and one on ``x_adv`` per
    sample (one call) to the feature network's passes when that is the target. ``kind`` is white-box
    when the attacked model is the feature network, transfer otherwise.
    """

    name = "ssp"
    norms = ("linf", "l2")
    defaults = {"layer": None, "feature_model": None, "steps": 20, "alpha": None, "random_start": True, "eot": 1}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = "white-box" if self.params["feature_model"] is None else "transfer"
        self._features: nn.Module | None = None

    def validate(self) -> None:
        super().validate()
        p = self.params
        if self.targeted:
            raise RobustlabError(f"attack {self.name!r} is label-free and cannot be targeted")
        if p["alpha"] is not None and not (isinstance(p["alpha"], float) and p["alpha"] > 0):
            raise RobustlabError(f"attack {self.name!r}: alpha must be a number > 0, got {p['alpha']!r}")
        if p["eot"] < 1:
            raise RobustlabError(f"attack {self.name!r}: eot must be >= 1, got {p['eot']}")
        for key in ("layer", "feature_model"):
            if p[key] is not None and not (isinstance(p[key], str) and p[key]):
                raise RobustlabError(f"attack {self.name!r}: {key} must be a name, got {p[key]!r}")

    def step_size(self) -> float:
        alpha = self.params["alpha"]
        return float(alpha) if alpha is not None else 2.5 * self.threat.eps / self.params["steps"]

    def feature_network(self, model: nn.Module, device: torch.device | str) -> nn.Module:
        """The feature network: ``feature_model`` loaded once (cached), or the attacked ``model``."""
        spec = self.params["feature_model"]
        if spec is None:
            return model
        if self._features is None:
            from robustlab.models.loading import load_model

            self._features = load_model(spec, device=device).model.eval()
        return self._features.to(device)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n = x.shape[0]
        network = self.feature_network(model, x.device)
        features = FeatureExtractor(network, p["layer"])
        own = network is model
        with eval_mode(network), torch.no_grad():
            clean = features(x).detach()

        def distortion(out: torch.Tensor) -> torch.Tensor:
            return (out - clean).flatten(1).square().mean(dim=1)

        alpha = self.step_size()
        x_cur = self.threat.random_init(x, generator, radius="uniform") if p["random_start"] else x.clone()
        with eval_mode(network):
            for _ in range(p["steps"]):
                # The gradient summed over the draws (its scale does not matter to a steepest step).
                _, _, grad = eot_gradient(features, distortion, x_cur, p["eot"], average=False)
                x_cur = self.threat.project(x_cur + self.threat.steepest_step(grad, alpha, x_cur), x)
        # One call: the target's predictions on the clean and the perturbed images.
        logits = self.logits(model, torch.cat([x, x_cur]))
        success = logits[n:].argmax(dim=1) != logits[:n].argmax(dim=1)
        grads = torch.full((n,), p["steps"] * p["eot"], dtype=torch.long, device=x.device)
        forwards = 2 + (grads + 1 if own else torch.zeros_like(grads))
        return AttackResult(x_cur, success, grads, forwards)


# ---------------------------------------------------------------------- folders of images


@dataclass
class FolderResult:
    """What :func:`perturb_folder` wrote: ``files[i]`` (PNG) is the perturbed ``sources[i]``, and
    ``changed[i]`` says whether the model's prediction on the written 8-bit image differs from its
    prediction on the source."""

    sources: list[Path]
    files: list[Path]
    changed: list[bool]

    @property
    def change_rate(self) -> float:
        return sum(self.changed) / len(self.changed) if self.changed else 0.0


def _to_uint8(x_adv: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """8-bit images (N, H, W) or (N, H, W, 3) of ``x_adv``, with each pixel's change from ``x`` (which
    lies on the 1/255 grid) rounded towards zero, so the written image never leaves the threat model."""
    clean = torch.round(x * 255)
    change = (x_adv - x) * 255
    # Round towards zero, but let a change within float noise of a whole step keep that step.
    change = torch.sign(change) * torch.floor(change.abs() + 1e-3)
    pixels = (clean + change).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def perturb_folder(
    attack: Attack,
    model: nn.Module,
    in_dir: str | Path,
    out_dir: str | Path,
    image_size: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | None = None,
    model_desc: str = "the model",
    input_size: Sequence[int] | None = None,
) -> FolderResult:
    """Perturb every image in ``in_dir`` (sub-folders included; no labels needed) with ``attack``
    against ``model`` and write each result as ``out_dir/<same relative path>.png``.

    The labels given to the attack are the model's own predictions on the clean images, so any
    untargeted attack works (SSP ignores them). ``image_size`` resizes every image to a square of that
    side first (bilinear); without it images of different sizes are attacked in separate batches. Grey
    images stay grey unless the folder also holds RGB images (then all are RGB). Images are read as
    8 bits, so the clean image lies on the 1/255 grid; each pixel's change is rounded towards zero when
    written, so the saved image is still inside the threat model. Randomness: batch ``i`` uses the
    generator ``make_generator(seed, i)``. A model that cannot take the images (channels, size: what it
    is built for, ``input_size`` when known) fails on the first batch with one line naming
    ``model_desc``. Returns a :class:`FolderResult`.
    """
    from robustlab.data.arrays import uint8_images_to_tensor
    from robustlab.data.image_folder import folder_to_folder
    from robustlab.models.probe import probe_model
    from robustlab.seeding import make_generator

    if batch_size < 1:
        raise RobustlabError(f"batch_size must be >= 1, got {batch_size}")
    src, dst, sources = folder_to_folder(in_dir, out_dir)
    targets = [dst / p.relative_to(src).with_suffix(".png") for p in sources]
    seen: dict[Path, Path] = {}
    for s, t in zip(sources, targets):
        if t in seen:
            raise RobustlabError(f"{seen[t].name} and {s.name} would both be written to {t}; rename one")
        seen[t] = s
    from PIL import Image

    from robustlab.data.image_folder import _read_image

    arrays = [_read_image(p, image_size) for p in sources]
    rgb = any(a.ndim == 3 for a in arrays)
    if rgb:
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    # Batches of images of one size, in file order within each size.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    batches = [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    changed = [False] * len(sources)
    bar = show_progress(total=len(sources), desc="perturb", unit="image", enabled=progress)
    for b, members in enumerate(batches):
        x = uint8_images_to_tensor(np.stack([arrays[i] for i in members]), str(src)).to(device)
        labels = probe_model(model, x, model_desc=model_desc, data_desc=str(src), input_size=input_size).argmax(dim=1)
        with fast_runtime(model, x):  # the CPU speed context, as the evaluation runner applies it
            result = attack.run(model, x, labels, make_generator(seed, b, device=device))
        pixels = _to_uint8(result.x_adv, x)
        # What is written is what counts: the 8-bit images, rounded towards the clean ones.
        written = uint8_images_to_tensor(pixels, str(src)).to(device)
        with eval_mode(model), torch.no_grad():
            now = check_logits(model(written), x.shape[0]).argmax(dim=1)
        for k, i in enumerate(members):
            targets[i].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[k]).save(targets[i], format="PNG")
            changed[i] = bool(now[k] != labels[k])
        bar.update(len(members))
    bar.close()
    return FolderResult(sources, targets, changed)

