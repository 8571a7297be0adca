"""Fixtures every test folder shares."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cluster.local import free_ports

_handed_out: set[int] = set()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no other test got.

    From cluster.local's range, outside the kernel's ephemeral ports: a port the
    kernel handed out can be taken by an outgoing connection before the server
    binds it (that failed a Ray dashboard start in CI).
    """
    (port,) = free_ports(1, exclude=_handed_out)
    _handed_out.add(port)
    return port


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    return _free_port
