"""Test-side MQTT tools: a recording subscriber, retained-state reads, a TCP gate."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from types import TracebackType

import aiomqtt

from tests.broker import Mosquitto, free_port

WAIT_S = 10.0


async def poll(predicate: Callable[[], bool], within: float = WAIT_S) -> None:
    """Re-check a condition that has no event to wait on (a metric, a log) every 10 ms."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0.01)


class Subscriber:
    """A test-side MQTT client that records everything it receives."""

    def __init__(self, broker: Mosquitto, *filters: str, password: str | None = None) -> None:
        tls = aiomqtt.TLSParameters(ca_certs=broker.ca_certs) if broker.tls else None
        user = next(iter(broker.users), None)
        self.client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=user,
            password=password if password is not None else broker.users.get(user or ""),
            tls_params=tls,
            timeout=5,
        )
        self.filters = filters
        self.messages: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    async def until(self, predicate: Callable[[], bool], within: float = WAIT_S) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

    async def _collect(self) -> None:
        async for message in self.client.messages:
            self.messages.append(message)
            self._arrived.set()

    async def __aenter__(self) -> Subscriber:
        await self.client.__aenter__()
        for topic_filter in self.filters:
            await self.client.subscribe(topic_filter, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)


async def retained(broker: Mosquitto, *filters: str) -> dict[str, bytes]:
    """What a late subscriber gets: the retained messages on ``filters``."""
    marker = f"streamd-test/marker/{uuid.uuid4().hex}"
    async with Subscriber(broker, *filters, marker) as sub:
        # Retained messages follow each SUBACK; our own message comes back after them.
        await sub.client.publish(marker, b"sync", qos=1)
        await sub.until(lambda: bool(sub.on(marker)))
        return {m.topic.value: bytes(m.payload) for m in sub.messages if m.retain}


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Gate:
    """A TCP forwarder in front of a broker: what the publisher sees as "the broker's port".

    The test decides when it listens, so a subscriber can be subscribed on a (re)started broker
    before the publisher can reach it (a fresh mosquitto keeps no sessions). With ``delay_s``,
    each link reaches the broker only that long after the client connected: a slow broker,
    whose CONNACK comes late.
    """

    def __init__(self, upstream: Mosquitto, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self._upstream = upstream
        self._delay_s = delay_s
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Future[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    def shut(self) -> None:
        """Refuse new connections (synchronously); open links end when the broker's side does."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def aclose(self) -> None:
        self.shut()
        for writer in self._writers:
            writer.close()  # ends the pumps; cancelling a link task makes asyncio log an error
        async with asyncio.timeout(5):
            await asyncio.gather(*self._links, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done = asyncio.get_running_loop().create_future()
        self._links.add(done)
        self._writers.add(writer)
        try:
            await asyncio.sleep(self._delay_s)  # what the client waits for is its CONNACK
            host, port = self._upstream.host, self._upstream.port
            up_reader, up_writer = await asyncio.open_connection(host, port)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
                with contextlib.suppress(ConnectionError):
                    await up_writer.wait_closed()
                self._writers.discard(up_writer)
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._links.discard(done)
            done.set_result(None)
