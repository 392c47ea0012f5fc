"""The one place that reaches into aiomqtt's and paho's private API (pinned versions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiomqtt


def close_socket(client: aiomqtt.Client) -> None:
    """Close the paho socket behind ``client`` if it is still open; a no-op otherwise.

    Why: a connection attempt whose CONNACK timed out, or a DISCONNECT that timed out, leaves
    paho's socket open and registered with the event loop, and aiomqtt 2.x has no public call
    to close it (``Client.__aexit__`` only disconnects a client that is connected). Without
    this, every failed attempt of the reconnect loop leaks a file descriptor.

    Private API used, checked against aiomqtt 2.5.1 and paho-mqtt 2.2.0: ``aiomqtt.Client``
    keeps its ``paho.mqtt.client.Client`` as ``_client``; paho's ``_sock_close()`` closes the
    socket and, through ``on_socket_unregister_write`` and ``on_socket_close``, removes its fd
    from aiomqtt's loop (a plain ``socket().close()`` would leave a dead fd registered).
    aiomqtt 3 no longer wraps paho: revisit this function when moving to it.
    """
    paho = client._client
    if paho.socket() is not None:
        paho._sock_close()
