"""Evaluation protocols by name: what a run does per batch and how its rows become numbers."""

from __future__ import annotations

from robustlab.errors import RobustlabError
from robustlab.eval.protocols.adversarial import AdversarialProtocol
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.protocols.certified import CertifiedOptions, CertifiedProtocol
from robustlab.eval.protocols.corruption import CorruptionProtocol
from robustlab.eval.protocols.detection import DetectionProtocol
from robustlab.eval.protocols.segmentation import SegmentationProtocol
from robustlab.eval.protocols.structured import StructuredProtocol
from robustlab.eval.protocols.verified import VerifiedProtocol
from robustlab.eval.protocols.zero_shot import ZeroShotProtocol

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (AdversarialProtocol, CertifiedProtocol, CorruptionProtocol,
                                                            DetectionProtocol, SegmentationProtocol, StructuredProtocol,
                                                            VerifiedProtocol, ZeroShotProtocol)}


def protocol_class(name: str) -> type[Protocol]:
    """The protocol a stored run was made with."""
    if name not in PROTOCOLS:
        raise RobustlabError(f"runs of protocol {name!r} need a newer robustlab (this one knows "
                             f"{', '.join(sorted(PROTOCOLS))})")
    return PROTOCOLS[name]


__all__ = ["PROTOCOLS", "AdversarialProtocol", "BatchContext", "BatchOutput", "CertifiedOptions", "CertifiedProtocol",
           "CorruptionProtocol", "DetectionProtocol", "Protocol", "SegmentationProtocol", "StructuredProtocol", "Task", "VerifiedProtocol",
           "ZeroShotProtocol", "protocol_class"]
