"""Make files and folders really unwritable for this process, also when the tests run as root (CI
containers do), where file modes are ignored: as root the paths get the immutable attribute
(``chattr +i``, which stops root too) for the duration of the block; where that is not possible the
test is skipped with the reason. Each path is checked to be unwritable before the block runs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest


def _writable(path: Path) -> bool:
    try:
        if path.is_dir():
            probe = path / f".probe-{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        else:
            with open(path, "r+b"):
                pass
        return True
    except OSError:
        return False


@contextmanager
def unwritable(*paths: Path):
    """Within the block no path can be written (a folder: nothing created in it, a file: not opened
    for writing). Yields how ("chmod" or "chattr +i")."""
    paths = tuple(Path(p) for p in paths)
    if os.getuid() != 0:
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root (file modes do not stop root) and chattr is not installed")
    done = []
    try:
        for p in paths:
            r = subprocess.run([chattr, "+i", str(p)], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"running as root (file modes do not stop root) and chattr +i failed here: {r.stderr.strip()}")
            done.append(p)
        still = [str(p) for p in paths if _writable(p)]
        if still:
            pytest.skip(f"running as root and chattr +i did not make {still} unwritable")
        yield "chattr +i"
    finally:
        for p in done:
            subprocess.run([chattr, "-i", str(p)], check=False, capture_output=True)
