"""robustlab: measure and improve the adversarial robustness of vision models.

Images are float tensors in NCHW with values in [0, 1]; normalization lives inside the model.
"""

__version__ = "0.1.0"

from robustlab.errors import RobustlabError  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

__all__ = ["RobustlabError", "ThreatModel", "__version__"]
