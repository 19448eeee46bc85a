"""A free TCP port: the one way the package (and its tests) picks a port for a server or a rendezvous.

It lives in ``config``, the lowest package, beside ``files``: the sidecar (``rollout``) and the
process groups (``runtime``) both need it, and ``config`` is the one package both may import
without pulling in torch.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ('' and '::' mean every IPv4 address).

    The port is released before it is returned, so another process may take it first: callers
    bind it soon after.
    """
    with socket.socket() as s:
        s.bind((host if host not in ("", "::") else "0.0.0.0", 0))
        return s.getsockname()[1]
