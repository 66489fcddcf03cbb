"""The proxy's plain listeners: IP literals bound by the proxy, host names left to the event loop."""

from __future__ import annotations

import socket

import pytest

from tether.proxy.listen import listening_socket


def test_an_ipv4_literal_is_bound_and_accepts() -> None:
    sock = listening_socket(("127.0.0.1", 0), 16)
    assert sock is not None
    with sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with socket.create_connection((host, port), timeout=5):
            sock.setblocking(True)
            sock.settimeout(5)
            conn, _ = sock.accept()
            conn.close()


def test_an_ipv6_literal_is_bound_ipv6_only() -> None:
    try:
        sock = listening_socket(("::1", 0), 16)
    except OSError as e:  # no IPv6 on this host
        pytest.skip(f"no IPv6 loopback: {e}")
    assert sock is not None
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def test_a_host_name_is_left_to_the_loop() -> None:
    assert listening_socket(("localhost", 0), 16) is None


def test_a_port_in_use_is_an_error_not_a_fallback() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(OSError):
        listening_socket(("127.0.0.1", taken.getsockname()[1]), 16)
