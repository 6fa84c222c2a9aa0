"""Shared fixtures: tests run offline and start from a fixed seed."""

from __future__ import annotations

import socket

import pytest
import torch

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _refuse(*args, **kwargs):
    raise RuntimeError("network access in tests")


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Any attempt to open a network connection fails loudly (unix sockets and this machine's
    loopback, where the serve tests run their server, still work)."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection = socket.create_connection

    def guarded(method):
        def wrapper(self, address, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
                _refuse()
            return method(self, address, *args, **kwargs)

        return wrapper

    def guarded_create(address, *args, **kwargs):
        if address[0] not in LOOPBACK:
            _refuse()
        return create_connection(address, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded(connect))
        patch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
        patch.setattr(socket, "create_connection", guarded_create)
        yield


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors, where intra-op threads cost far more than they save (tens of times
    more on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def built_kernels(tmp_path_factory):
    """linearize's kernels (engine.kernels) built once for the session, in a cache of their own
    (nothing where this machine cannot build them)."""
    from linearize.engine import kernels

    root = tmp_path_factory.mktemp("kernels-cache")
    kernels.library(root)
    (root / "kernels").mkdir(exist_ok=True)
    return root / "kernels"


@pytest.fixture
def user_cache(tmp_path, monkeypatch, built_kernels):
    """A user cache folder of this test's own (``$XDG_CACHE_HOME``: engine graphs, calibrations,
    timings) whose kernels are the session's: each new cache folder would compile them again,
    most of an engine test's time (~8 s)."""
    home = tmp_path / "cache"
    (home / "linearize").mkdir(parents=True)
    (home / "linearize" / "kernels").symlink_to(built_kernels, target_is_directory=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home
