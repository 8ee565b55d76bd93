"""Free ports for local meshes are drawn below the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket

from mesh.ports import _ephemeral_low, free_port


def test_a_free_port_is_bindable_and_below_the_ephemeral_range() -> None:
    port = free_port()
    assert 10_000 <= port < _ephemeral_low()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port(random.Random(7))))
        taken = held.getsockname()[1]
        assert free_port(random.Random(7)) != taken  # the same draw skips the busy port
