"""Fixtures shared by the whole suite. Keep each one small and documented here.

- ``hub_root``: a fresh hub root (``tmp_path/"hub"``) holding a *copy* of the real
  ``sentence-transformers/all-MiniLM-L6-v2``; add repos with
  :func:`mmfs.testing.models.make_synthetic_model` (``hub_root / "org" / "name"``).
- ``hub``: a running :class:`mmfs.testing.hub.TestHub` over ``hub_root`` on a free
  loopback port, stopped after the test; ``hub.url`` is the ``HF_ENDPOINT``.
- Tests marked ``fuse`` (real mounts) need ``/dev/fuse`` and root: without them they
  skip, except under CI (``CI`` set), where that fails them: they must never skip there.
- ``backing_dir``: a fresh folder on a file system that can back FUSE passthrough files
  (not overlayfs, which the kernel refuses as a backing file's home); the same CI rule.
- ``overlay_dir``: the merged folder of a fresh overlayfs mount (unmounted afterwards), for
  the fallback from passthrough; the same CI rule.
- Hypothesis profiles (``tests/test_fuzz.py``): ``ci`` (the default: 60 examples per
  property, a few seconds in all) and ``long`` (``HYPOTHESIS_PROFILE=long``: 1,000, minutes).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

from mmfs.testing.hub import TestHub
from mmfs.testing.mount import filesystem_type
from mmfs.testing.models import populate_hub_root


settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    return populate_hub_root(tmp_path / "hub")


@pytest.fixture
def hub(hub_root: Path) -> Iterator[TestHub]:
    with TestHub(hub_root) as running:
        yield running


@pytest.fixture(autouse=True)
def _fuse_tests_need_fuse(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("fuse") is None:
        return
    if not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    elif os.geteuid() != 0:
        reason = "real mounts need root"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: FUSE tests must run in CI")
    pytest.skip(reason)


@pytest.fixture
def backing_dir(tmp_path: Path) -> Iterator[Path]:
    if filesystem_type(tmp_path) != "overlayfs":
        yield tmp_path
        return
    for base in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(base) and filesystem_type(Path(base)) != "overlayfs":
            path = Path(tempfile.mkdtemp(prefix="mmfs-passthrough-", dir=base))
            try:
                yield path
            finally:
                subprocess.run(["rm", "-rf", str(path)], check=False)
            return
    reason = "no folder outside overlayfs for FUSE passthrough backing files"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set")
    pytest.skip(reason)


@pytest.fixture
def overlay_dir(tmp_path: Path) -> Iterator[Path]:
    layers = {name: tmp_path / f"overlay-{name}" for name in ("lower", "upper", "work", "merged")}
    for path in layers.values():
        path.mkdir()
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    made = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])],
                          capture_output=True, text=True)
    if made.returncode != 0:
        reason = f"cannot mount an overlayfs here: {made.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set")
        pytest.skip(reason)
    try:
        yield layers["merged"]
    finally:
        subprocess.run(["umount", "-l", str(layers["merged"])], check=False)
