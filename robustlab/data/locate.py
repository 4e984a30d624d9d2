"""Where data sets live: the data root, and the one error raised when a data set is not there."""

from __future__ import annotations

import os
from pathlib import Path

from robustlab.errors import RobustlabError

DATA_ENV_VAR = "ROBUSTLAB_DATA"


def default_data_root(root: str | Path | None = None) -> Path:
    """The folder data sets are read from: ``root`` if given, else ``$ROBUSTLAB_DATA`` if set, else
    ``./data`` (relative to the current directory). Returns an absolute path; it need not exist."""
    return resolve_data_root(root)[0]


def resolve_data_root(root: str | Path | None) -> tuple[Path, str]:
    """(data root, where it came from) -- see :func:`default_data_root`."""
    if root is not None:
        return Path(root).expanduser().resolve(), "the root argument"
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser().resolve(), f"${DATA_ENV_VAR}"
    return Path("data").resolve(), f"the default ./data (set ${DATA_ENV_VAR} or pass root= to change it)"


def missing_dataset_error(
    name: str, split: str, root: Path, source: str, tried: list[Path], layouts: list[str]
) -> RobustlabError:
    """The error for a data set that is not on disk: which one, every path tried, the layouts
    expected, and that nothing is downloaded."""
    lines = [f"data set {name!r} (split {split!r}) was not found; robustlab never downloads data."]
    where = f"Data root: {root} (from {source})"
    if not root.is_dir():
        where += " -- this folder does not exist"
    lines.append(where)
    lines.append("Paths tried:")
    lines += [f"  {p}" for p in tried]
    lines.append("Expected one of these layouts:")
    lines += [f"  - {layout}" for layout in layouts]
    lines.append(f"Put the files there, pass root=..., or set ${DATA_ENV_VAR} to the folder that holds them.")
    return RobustlabError("\n".join(lines))
