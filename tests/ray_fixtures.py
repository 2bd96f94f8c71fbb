"""One local Ray for the whole test session (Ray starts in ~3-5 s and takes ~0.7 GB):
on loopback, its temp dir made and removed by :func:`router.capacity.raykit.ray_session`,
two CPUs; shut down when the session ends."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A :class:`router.capacity.raykit.RaySession` of a local Ray (``.address`` for a
    second driver, e.g. ``tandem capacity whatif --ray-address``)."""
    from router.capacity.raykit import ray_session

    with ray_session(num_cpus=2) as session:
        yield session
