"""MQTT sink: bounded event outbox, retained state, last will, HA discovery (aiomqtt 2.x only)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from streamd import __version__
from streamd.backoff import backoff_delay
from streamd.config import MqttConfig
from streamd.domain import Event
from streamd.metrics import Metrics
from streamd.sinks.discovery import DiscoveryContext, config_filter, discovery_configs, node_id_for
from streamd.sinks.outbox import Outbox
from streamd.sinks.paho_compat import close_socket

logger = logging.getLogger(__name__)
# paho logs the socket error behind every lost connection at ERROR; we log each state change
# once ourselves. Left at CRITICAL unless configured (e.g. to DEBUG, to see paho's view).
_paho_logger = logging.getLogger(f"{__name__}.paho")
if _paho_logger.level == logging.NOTSET:
    _paho_logger.setLevel(logging.CRITICAL)

NETWORK_TIMEOUT_S = 10.0  # every broker round trip: CONNACK, PUBACK, SUBACK, DISCONNECT
CONNECT_TIMEOUT_S = 30.0  # outer bound of one attempt (paho bounds TCP and TLS at 5 s each)
CLOSE_TIMEOUT_S = 2 * NETWORK_TIMEOUT_S  # close() without a timeout
TAKEOVER_DROPS = 3  # short-lived connections in a row that mean a client_id is shared
STABLE_S = 10.0  # a connection that lasted this long resets the backoff; a flapping one does not
EVENT_BATCH = 32  # events pipelined at once: in order on one connection, acked in order
ANALYSIS_QUEUE = 64  # analysis messages waiting (connected or first connecting); oldest dropped
INCOMING_QUEUE = 1000
DISCOVERY_COLLECT_S = 0.5  # retained configs follow the SUBACK at once; grace for slow brokers
OFFLINE_ON_CANCEL_S = 1.0
REFUSED_LOGIN_CODES = frozenset({4, 5, 134, 135})  # CONNACK: MQTT 3.1.1 (4, 5), 5.0 (134, 135)
UNSPECIFIED_ERROR = 128
DROP_REASONS = ("outbox_full", "disconnected", "analysis_full")


@dataclass(frozen=True, slots=True)
class _EventMessage:
    """An event message waiting in the outbox for its PUBACK."""

    event: Event
    topic: str
    payload: bytes
    enqueued_s: float


class _Link(enum.Enum):
    """The broker connection, as the sink calls see it."""

    STARTING = "starting"  # the first attempt is under way: analysis messages are held
    UP = "up"
    DOWN = "down"  # an attempt failed or a connection was lost: analysis messages are dropped


class MqttPublisher:
    """Publishes to one broker and reconnects forever; an ``EventSink``.

    aiomqtt 2.x does not reconnect: ``run`` does, with capped full-jitter backoff and a fresh
    ``Client`` per attempt (no half-reset state carries over). An event leaves the bounded
    outbox only once the broker acknowledged it (PUBACK); whatever was unacknowledged when a
    connection dropped is sent again, in order. So delivery is at least once and ``seq`` stays
    gap-free while the outbox has room; past ``outbox_size`` the oldest event is dropped and
    counted. On every connect: retained ``online`` on ``{prefix}/available`` (the will says
    ``offline``), every stream's latest status and snapshot, HA discovery (node id
    ``node_id_for(client_id)``, configs of removed streams cleared), then the outbox. On
    ``close``: every stream's status ``offline``, acknowledged, and only then ``available``
    ``offline`` (whatever the pipelines last said: nobody reports frames after a stop).
    """

    def __init__(
        self,
        config: MqttConfig,
        metrics: Metrics,
        streams: Sequence[str],
        *,
        model_id: str = "",
        on_settled: Callable[[Event, bool], None] | None = None,
    ) -> None:
        self._config = config
        self._on_settled = on_settled
        self._metrics = metrics
        self._prefix = prefix = config.topic_prefix
        self._available = f"{prefix}/available"
        node_id = node_id_for(config.client_id)
        ctx = DiscoveryContext(prefix, config.discovery_prefix, node_id, model_id, __version__)
        self._discovery = discovery_configs(streams, ctx) if config.ha_discovery else {}
        self._discovery_filter = config_filter(config.discovery_prefix, node_id)
        self._found_configs: set[str] | None = None
        self._streams = dict.fromkeys(streams)  # every stream that gets a status
        self._outbox: Outbox[_EventMessage] = Outbox(config.outbox_size, self._dropped)
        self._analysis: deque[tuple[str, bytes]] = deque()
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # retained topics to publish, in order
        self._link = _Link.STARTING
        self._wake = asyncio.Event()  # a sink call or close(): there may be work
        self._drained = asyncio.Event()  # the outbox is empty
        self._drained.set()
        self._stop = asyncio.Event()  # close() was called
        self._stopped = asyncio.Event()  # run() is not running
        self._stopped.set()
        self._last_failure: str | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not crypto
        self._where = f"{config.host}:{config.port}"
        metrics.outbox_messages.set_function(lambda: self.pending)
        metrics.mqtt_connected.set(0)
        for reason in DROP_REASONS:
            metrics.mqtt_dropped.labels(reason=reason)

    def stream_status(self, stream: str, online: bool) -> None:
        """Retained ``{prefix}/{stream}/status``: ``online`` / ``offline`` (latest wins).

        After ``close`` it is always ``offline``: a source that reports in late must not undo
        the goodbye.
        """
        self._streams.setdefault(stream)
        online = online and not self._stop.is_set()
        self._set_retained(f"{self._prefix}/{stream}/status", b"online" if online else b"offline")

    def snapshot(self, stream: str, jpeg: bytes) -> None:
        """Retained ``{prefix}/{stream}/snapshot`` (latest wins)."""
        self._set_retained(f"{self._prefix}/{stream}/snapshot", jpeg)

    def event(self, event: Event, payload: bytes) -> None:
        """Queue an event message (QoS 1); past ``outbox_size`` the oldest is dropped."""
        topic = f"{self._prefix}/{event.stream}/events"
        self._outbox.append(_EventMessage(event, topic, payload, time.monotonic()))
        self._drained.clear()
        self._wake.set()

    def analysis(self, stream: str, payload: bytes) -> None:
        """Queue an analysis message (QoS 0); dropped and counted while disconnected.

        Until the first connection attempt ends, messages are held (bounded) rather than
        dropped, so the first windows of a run reach the broker too.
        """
        if self._link is _Link.DOWN:
            self._metrics.mqtt_dropped.labels(reason="disconnected").inc()
            return
        if len(self._analysis) >= ANALYSIS_QUEUE:
            self._analysis.popleft()
            self._metrics.mqtt_dropped.labels(reason="analysis_full").inc()
        self._analysis.append((f"{self._prefix}/{stream}/analysis", payload))
        self._wake.set()

    def _dropped(self, message: _EventMessage) -> None:
        """The outbox dropped its oldest message to make room: count it, warn once per spell."""
        self._metrics.mqtt_dropped.labels(reason="outbox_full").inc()
        if self._on_settled is not None:
            self._on_settled(message.event, False)
        if self._outbox.drops_since_empty == 1:
            logger.warning(
                "mqtt: outbox full (%d events), dropping the oldest", self._outbox.capacity
            )

    def _set_retained(self, topic: str, payload: bytes) -> None:
        self._retained[topic] = payload
        self._dirty[topic] = None
        self._wake.set()

    async def run(self) -> None:
        """Connect, publish, reconnect with backoff; returns after ``close``, else runs forever."""
        self._stopped.clear()
        attempt = 0
        short_lives = 0  # connections in a row that the broker dropped soon after CONNACK
        try:
            while not self._stop.is_set():
                uptime = await self._attempt()
                if self._stop.is_set():
                    break
                if uptime >= STABLE_S:
                    attempt = short_lives = 0
                elif uptime > 0:
                    short_lives += 1
                    if short_lives == TAKEOVER_DROPS:
                        self._warn_takeover(short_lives)
                delay = backoff_delay(attempt, self._rng)
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()  # close() cuts the wait short
        finally:
            self._stopped.set()

    def _warn_takeover(self, drops: int) -> None:
        # MQTT 3.1.1 brokers drop the older of two connections with one client id without a
        # reason code: a connection that keeps dying right after CONNACK is the symptom.
        logger.error(
            "mqtt: %s dropped the connection right after connecting %d times in a row: another"
            " client is probably using client_id %r; give each streamd instance its own"
            " mqtt.client_id and mqtt.topic_prefix",
            self._where,
            drops,
            self._config.client_id,
        )

    @property
    def pending(self) -> int:
        """Events in the outbox, not yet acknowledged by the broker."""
        return len(self._outbox)

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - contract
        """Wait until every queued event is acknowledged (PUBACK): ``pending`` is then 0.

        Args:
            timeout: Seconds to wait; None waits until the caller's own deadline cancels it.
                Either way, giving up logs how many events are left.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except (TimeoutError, asyncio.CancelledError) as exc:
            logger.warning("mqtt: %d events still in the outbox", len(self._outbox))
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - contract
        """Say goodbye if connected, disconnect and end ``run``.

        The goodbye: every stream's status ``offline``, then ``available`` ``offline``
        (retained, QoS 1, each acknowledged, in that order).

        Args:
            timeout: Seconds to wait for that (default ``CLOSE_TIMEOUT_S``).
        """
        self._stop.set()
        self._wake.set()
        if self._stopped.is_set():
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S if timeout is None else timeout):
                await self._stopped.wait()
        except TimeoutError:
            logger.warning("mqtt: no clean disconnect from %s in time", self._where)

    async def _attempt(self) -> float:
        """One connection attempt and, if it succeeds, its whole life; returns its uptime."""
        client = self._new_client()
        up_since: float | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await stack.enter_async_context(client)
                up_since = time.monotonic()
                self._set_link(_Link.UP)
                await self._session(client)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            if up_since is None:
                self._log_failure(exc)
            else:
                logger.warning("mqtt: lost the connection to %s: %s", self._where, _reason(exc))
        else:
            logger.info("mqtt: disconnected from %s", self._where)
        finally:
            self._set_link(_Link.DOWN)
            close_socket(client)  # a timed-out CONNACK or DISCONNECT leaves it open
        return 0.0 if up_since is None else time.monotonic() - up_since

    async def _session(self, client: aiomqtt.Client) -> None:
        """Serve a connection until it drops (raises ``MqttError``) or ``close`` ends it."""
        watch = asyncio.create_task(self._watch(client), name="streamd.mqtt.watch")
        serve = asyncio.create_task(self._serve(client), name="streamd.mqtt.serve")
        try:
            await asyncio.wait((watch, serve), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Cancelled without close(): still tell subscribers, briefly; the will is the backstop.
            serve.cancel()
            with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError):
                await serve
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(OFFLINE_ON_CANCEL_S):
                    await self._say_goodbye(client)
            raise
        finally:
            for task in (watch, serve):
                task.cancel()
            results = await asyncio.gather(watch, serve, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Collect discovery configs; raises ``MqttError`` when the connection drops."""
        async for message in client.messages:  # we only ever subscribe to our configs
            if self._found_configs is not None and message.payload:
                self._found_configs.add(message.topic.value)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Announce, drain the backlog, clean discovery, publish as work arrives; say goodbye."""
        await client.publish(self._available, b"online", qos=1, retain=True)
        # Every stream's latest status, then its snapshot (the sort is stable).
        self._dirty = dict.fromkeys(sorted(self._retained, key=lambda t: t.endswith("/snapshot")))
        await self._publish_retained(client)
        for topic, payload in self._discovery.items():
            await client.publish(topic, payload, qos=1, retain=True)
        while self._outbox and not self._stop.is_set():
            await self._publish_events(client)
        if self._discovery and not self._stop.is_set():
            await self._clear_removed_discovery(client)
        while not self._stop.is_set():
            if not (
                await self._publish_retained(client)
                or await self._publish_events(client)
                or await self._publish_analysis(client)
            ):
                self._wake.clear()  # nothing to do: sleep until a sink call or close()
                if not (self._dirty or self._outbox or self._analysis or self._stop.is_set()):
                    await self._wake.wait()
        while await self._publish_analysis(client):  # at most ANALYSIS_QUEUE, no acks to await
            pass
        await self._say_goodbye(client)

    async def _publish_retained(self, client: aiomqtt.Client) -> bool:
        did = False
        while self._dirty:
            topic = next(iter(self._dirty))
            del self._dirty[topic]
            await client.publish(topic, self._retained[topic], qos=1, retain=True)
            did = True
        return did

    async def _publish_events(self, client: aiomqtt.Client) -> bool:
        """Pipeline the oldest events; drop each from the outbox once acked, in order."""
        batch = self._outbox.peek(EVENT_BATCH)
        if not batch:
            return False
        results = await asyncio.gather(
            *(client.publish(e.item.topic, e.item.payload, qos=1) for e in batch),
            return_exceptions=True,
        )
        now = time.monotonic()
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                raise result  # the rest stays queued and is sent again after a reconnect
            # False: dropped for room while in flight, and counted as dropped already.
            if self._outbox.ack(entry):
                event = entry.item.event
                if self._on_settled is not None:
                    self._on_settled(event, True)
                self._metrics.events_published.labels(
                    stream=event.stream, type=event.type.value
                ).inc()
                self._metrics.stage_seconds.labels(stage="publish").observe(
                    now - entry.item.enqueued_s
                )
        if not self._outbox:
            self._drained.set()
        return True

    async def _publish_analysis(self, client: aiomqtt.Client) -> bool:
        count = min(len(self._analysis), EVENT_BATCH)
        for _ in range(count):
            topic, payload = self._analysis.popleft()
            try:
                await client.publish(topic, payload, qos=0)
            except BaseException:
                self._metrics.mqtt_dropped.labels(reason="disconnected").inc()
                raise
        return count > 0

    async def _clear_removed_discovery(self, client: aiomqtt.Client) -> None:
        """Clear our retained discovery configs whose stream is no longer configured."""
        found: set[str] = set()
        self._found_configs = found
        try:
            await client.subscribe(self._discovery_filter, qos=1)
            # Retained messages follow the SUBACK at once; the grace covers slow brokers,
            # and close() cuts it short.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCOVERY_COLLECT_S):
                    await self._stop.wait()
            await client.unsubscribe(self._discovery_filter)
        finally:
            self._found_configs = None
        removed = sorted(found - self._discovery.keys())
        for topic in removed:
            await client.publish(topic, b"", qos=1, retain=True)
        if removed:
            logger.info("mqtt: cleared %d HA discovery configs of removed streams", len(removed))

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        """Every stream ``offline``, acknowledged, then ``available`` ``offline`` (spec order).

        Sent at most twice (a cancel during a close's goodbye): retained, so harmless.
        """
        for stream in self._streams:
            self._set_retained(f"{self._prefix}/{stream}/status", b"offline")
        await self._publish_retained(client)
        await client.publish(self._available, b"offline", qos=1, retain=True)

    def _new_client(self) -> aiomqtt.Client:
        cfg = self._config
        tls_params: aiomqtt.TLSParameters | None = None
        tls_insecure: bool | None = None
        if (tls := cfg.tls) is not None:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
                certfile=str(tls.certfile) if tls.certfile else None,
                keyfile=str(tls.keyfile) if tls.keyfile else None,
                cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
            )
            tls_insecure = tls.insecure  # insecure: no certificate and no hostname check
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=cfg.client_id,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            keepalive=cfg.keepalive_s,
            will=aiomqtt.Will(self._available, b"offline", qos=1, retain=True),
            tls_params=tls_params,
            tls_insecure=tls_insecure,
            timeout=NETWORK_TIMEOUT_S,
            max_queued_incoming_messages=INCOMING_QUEUE,
            logger=_paho_logger,
        )
        # aiomqtt warns past 10 pending calls; our pipelining is bounded by EVENT_BATCH.
        client.pending_calls_threshold = EVENT_BATCH + ANALYSIS_QUEUE
        return client

    def _set_link(self, link: _Link) -> None:
        if link is _Link.UP:
            self._last_failure = None
            logger.info("mqtt: connected to %s as %r", self._where, self._config.client_id)
        elif self._analysis:  # QoS 0 is not kept across connections
            self._metrics.mqtt_dropped.labels(reason="disconnected").inc(len(self._analysis))
            self._analysis.clear()
        self._link = link
        self._metrics.mqtt_connected.set(1 if link is _Link.UP else 0)

    def _log_failure(self, exc: BaseException) -> None:
        """One line per kind of failure; repeats of the same failure go to DEBUG."""
        level, reason, user = logging.ERROR, _reason(exc), self._config.username
        code = getattr(exc, "rc", None)  # an int, or paho's ReasonCode with .value
        if (
            isinstance(exc, MqttConnectError)
            and getattr(code, "value", code) in REFUSED_LOGIN_CODES
        ):
            who = "an anonymous login" if user is None else f"the login for {user!r}"
            message = f"mqtt: broker {self._where} refused {who}: {reason}"
        elif isinstance(exc, MqttConnectError):
            message = f"mqtt: broker {self._where} refused the connection: {reason}"
        else:
            level, message = logging.WARNING, f"mqtt: cannot connect to {self._where}: {reason}"
        if message == self._last_failure:
            level = logging.DEBUG
        self._last_failure = message
        logger.log(level, "%s", message)


def _reason(exc: BaseException) -> str:
    """A short reason for a log line."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = exc.__cause__ or exc
    rc = getattr(cause, "rc", None)
    if getattr(rc, "value", None) == UNSPECIFIED_ERROR:  # what paho says for a closed socket
        return "connection closed"
    if isinstance(cause, MqttConnectError) and rc is not None:
        return str(rc).lower()
    return str(cause) or type(cause).__name__
