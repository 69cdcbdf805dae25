"""A local sweep starts its own Ray: a dead cluster's address left in Ray's temp folder never captures it."""

from __future__ import annotations

import socket
import time

import pytest
import ray
from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address

from lora_sweep.config import load_config
from lora_sweep.driver import start_ray

pytestmark = pytest.mark.integration


def _dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # closed when the block ends: nothing answers there


@pytest.fixture
def stale_address_file(monkeypatch):
    """What `ray start --head` leaves when it dies without `ray stop`: its address, in Ray's temp folder."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = get_ray_address_file(None)
    saved = read_ray_address(None)
    dead = _dead_address()
    write_ray_address(dead)
    yield dead
    if saved is None:
        import os
        os.remove(path)
    else:
        write_ray_address(saved)


def test_a_stale_cluster_address_does_not_capture_a_local_sweep(stale_address_file, raw_config, write_config):
    ray.shutdown()
    config = load_config(write_config(raw_config))
    started = time.monotonic()
    try:
        start_ray(config)
        assert ray.is_initialized()
        # A new local Ray of the config's size, not the dead cluster.
        assert ray.cluster_resources().get("CPU") == 2
        assert stale_address_file not in ray.get_runtime_context().gcs_address
        assert time.monotonic() - started < 60
    finally:
        ray.shutdown()
