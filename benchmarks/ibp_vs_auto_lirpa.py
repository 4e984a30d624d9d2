"""robustlab's IBP and CROWN-IBP bounds against auto_LiRPA's on the same networks and inputs.

Claim: ``robustlab.certify.ibp`` computes the same bounds as auto_LiRPA (Xu et al. 2020, the
reference implementation of CROWN-IBP's authors): logit intervals by IBP, and lower bounds of the
margins ``z_y - z_j`` by IBP (last layer elided: auto_LiRPA merges the specification into the last
linear layer) and by CROWN-IBP, equal up to float rounding; and it is not slower.

auto_LiRPA on PyPI is 0.3 (2022, pins torch < 1.13); it does not import with our torch 2.14 and
numpy 2 as published. This script applies three compatibility shims before importing it, none of
which touches its bounding code: ``numpy.lib.arraysetops`` (gone in numpy 2) aliased to numpy's
``isin``; ``torch.onnx.symbolic_helper._set_opset_version`` (gone) re-created over torch's ONNX
globals; ``torch._C.Node.__getitem__`` (gone) re-created as the typed attribute getter. How to get
it without installing anything into the environment:

    pip download --no-deps auto_LiRPA==0.3 appdirs -d /tmp/alirpa
    cd /tmp/alirpa && mkdir pkg && cd pkg && for w in ../*.whl; do unzip -qo $w; done
    AUTO_LIRPA_PATH=/tmp/alirpa/pkg python benchmarks/ibp_vs_auto_lirpa.py

Networks: a two-layer MLP with hand-set weights, digits_mlp and dm_small with random weights, and
dm_small trained by ``benchmarks/ibp_mnist.py`` if its cache holds one (on MNIST test images).
Inputs: Linf balls clipped to the [0, 1] box (auto_LiRPA gets the clipped box as x_L, x_U).
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, environment, set_threads, shared_data_dir  # noqa: E402

from robustlab.certify.ibp import interval_bounds, margin_bounds  # noqa: E402
from robustlab.models import create_model  # noqa: E402


def import_auto_lirpa():
    """auto_LiRPA 0.3 with the shims described in the module docstring, or None (and why)."""
    path = os.environ.get("AUTO_LIRPA_PATH", "/tmp/alirpa/pkg")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    shim = types.ModuleType("numpy.lib.arraysetops")
    shim.isin = np.isin
    sys.modules.setdefault("numpy.lib.arraysetops", shim)
    import torch.onnx.symbolic_helper as helper

    if not hasattr(helper, "_set_opset_version"):
        from torch.onnx._internal.torchscript_exporter import _globals

        def _set_opset_version(version: int) -> None:
            _globals.GLOBALS.export_onnx_opset_version = version

        helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)
    try:
        import auto_LiRPA
    except ImportError as exc:
        return None, f"auto_LiRPA not importable from {path!r}: {exc}"
    return auto_LiRPA, auto_LiRPA.__version__


def hand_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return net.eval()


def networks() -> list[tuple[str, nn.Module, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    torch.manual_seed(0)
    out.append(("mlp 64-32-32-10 (random)", hand_mlp(), torch.rand(64, 1, 8, 8, generator=gen)))
    out.append(("digits_mlp (random)", create_model("digits_mlp").eval(), torch.rand(64, 1, 8, 8, generator=gen)))
    torch.manual_seed(1)
    out.append(("dm_small (random)", create_model("dm_small").eval(), torch.rand(64, 1, 28, 28, generator=gen)))
    trained = max(CACHE.glob("ibp_mnist_ibp-0.4*.safetensors"), default=None, key=lambda p: p.stat().st_mtime)
    if trained is not None:
        from safetensors.torch import load_file

        from robustlab.data import load_dataset

        model = create_model("dm_small")
        model.load_state_dict(load_file(trained))
        x = load_dataset("mnist", "test", root=shared_data_dir()).x[:64]
        out.append(("dm_small (IBP-trained, MNIST)", model.eval(), x))
    return out


def their_bounds(lirpa, model, x, y, eps, method):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    bounded = BoundedModule(model, torch.zeros_like(x[:1]), device="cpu")
    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    bx = BoundedTensor(x, ptb)
    lo, hi = bounded.compute_bounds(x=(bx,), method="IBP")
    classes = lo.shape[1]
    eye = torch.eye(classes)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        margin, _ = bounded.compute_bounds(x=(bx,), C=spec, method=method, bound_upper=False)
    seconds = time.perf_counter() - t0
    return lo, hi, margin, seconds


def main() -> None:
    set_threads(1)
    lirpa, version = import_auto_lirpa()
    lines = ["robustlab IBP / CROWN-IBP bounds vs auto_LiRPA (benchmarks/ibp_vs_auto_lirpa.py)",
             f"environment: {environment()}"]
    if lirpa is None:
        lines.append(f"auto_LiRPA: NOT RUN: {version}")
        print("\n".join(lines))
        return
    lines.append(f"auto_LiRPA {version} (PyPI wheel, with the three import shims of the docstring)")
    lines.append("")
    lines.append(f"{'network':<30} {'eps':>6} {'method':<9} {'max |d logit bnd|':>17} {'max |d margin|':>14} "
                 f"{'mean margin (ours)':>18} {'ours s':>7} {'theirs s':>8}")
    worst = 0.0
    for name, model, x in networks():
        with torch.no_grad():
            y = model(x).argmax(1)
        for eps in (0.001, 0.01, 0.05):
            for method, theirs in (("ibp", "IBP"), ("crown-ibp", "CROWN-IBP")):
                lo_t, hi_t, m_t, s_t = their_bounds(lirpa, model, x, y, eps, theirs)
                with torch.no_grad():
                    lo, hi = interval_bounds(model, x, eps)
                    t0 = time.perf_counter()
                    m = margin_bounds(model, x, y, eps, "linf", method)
                    s_o = time.perf_counter() - t0
                d_logit = max(float((lo - lo_t).abs().max()), float((hi - hi_t).abs().max()))
                d_margin = float((m - m_t).abs().max())
                scale = max(1.0, float(m.abs().max()))
                worst = max(worst, d_margin / scale, d_logit / max(1.0, float(hi.abs().max())))
                lines.append(f"{name:<30} {eps:>6g} {method:<9} {d_logit:>17.2e} {d_margin:>14.2e} "
                             f"{float(m.mean()):>18.4f} {s_o:>7.3f} {s_t:>8.3f}")
                print(lines[-1], flush=True)
    lines += ["", f"largest difference relative to the bound's scale: {worst:.2e}",
              "PASS: same bounds up to float rounding" if worst < 1e-4 else "FAIL: the bounds differ"]
    text = "\n".join(lines) + "\n"
    (RESULTS / "ibp_vs_auto_lirpa.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
