"""Home Assistant MQTT discovery messages for each stream (pure: topic -> JSON payload).

Schema checked against Home Assistant's MQTT integration (``homeassistant/components/mqtt``:
``schemas.py`` common entity options, ``sensor.py``, ``binary_sensor.py``, ``camera.py``) and its
2025.10 change that replaced ``object_id`` with ``default_entity_id`` (``<domain>.<object id>``;
``object_id`` stopped working in 2026.4, so it is not sent).

Topics are ``<discovery_prefix>/<component>/<node_id>/<stream>_<entity>/config``. The node id
is the MQTT client id (characters outside ``[a-zA-Z0-9_-]`` become ``_``): client ids are
unique per broker, so two streamd instances never clear each other's entities, and
``<discovery_prefix>/+/<node_id>/+/config`` matches exactly this instance's configs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

_NODE_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_ENTITY_ID_UNSAFE = re.compile(r"[^a-z0-9_]")
HA_STATE_MAX_CHARS = 255
"""Home Assistant rejects longer sensor states; descriptions are cut to fit."""


@dataclass(frozen=True, slots=True)
class DiscoveryContext:
    """What every discovery message of one streamd instance shares.

    Attributes:
        topic_prefix: streamd's topic prefix (``mqtt.topic_prefix``).
        discovery_prefix: Home Assistant's discovery prefix (``mqtt.discovery_prefix``).
        node_id: This instance's node id (``node_id_for(client_id)``).
        model_id: The model that scores windows (the device's ``model``); "" leaves it out.
        sw_version: streamd's version.
    """

    topic_prefix: str
    discovery_prefix: str
    node_id: str
    model_id: str = ""
    sw_version: str = ""


def node_id_for(client_id: str) -> str:
    """The discovery node id of the instance with MQTT client id ``client_id``."""
    return _NODE_ID_UNSAFE.sub("_", client_id)


def config_filter(discovery_prefix: str, node_id: str) -> str:
    """Subscription filter that matches every discovery config of one node."""
    return f"{discovery_prefix}/+/{node_id}/+/config"


def stream_configs(stream: str, ctx: DiscoveryContext) -> dict[str, dict[str, object]]:
    """The discovery configs of one stream's device: topic -> payload (not yet JSON)."""
    base = f"{ctx.topic_prefix}/{stream}"
    events = f"{base}/events"
    entities: list[tuple[str, str, dict[str, object]]] = [
        (
            "sensor",
            "last_event",
            {
                "name": "Last event",
                "icon": "mdi:cctv",
                "state_topic": events,
                "value_template": f"{{{{ value_json.description[:{HA_STATE_MAX_CHARS}] }}}}",
                # The whole event JSON (id, type, seq, start, end, significance...) as attributes.
                "json_attributes_topic": events,
            },
        ),
        (
            "sensor",
            "significance",
            {
                "name": "Significance",
                "icon": "mdi:alert-decagram",
                "state_topic": events,
                "value_template": "{{ value_json.peak_significance }}",
                "state_class": "measurement",
            },
        ),
        (
            "binary_sensor",
            "activity",
            {
                "name": "Activity",
                "device_class": "motion",
                "state_topic": events,
                # new/update keep it on; end turns it off.
                "value_template": "{{ 'OFF' if value_json.type == 'end' else 'ON' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
            },
        ),
        (
            "binary_sensor",
            "source",
            {
                "name": "Source",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": f"{base}/status",
                "payload_on": "online",
                "payload_off": "offline",
            },
        ),
        ("camera", "snapshot", {"name": "Snapshot", "topic": f"{base}/snapshot"}),
    ]
    device: dict[str, object] = {
        "identifiers": [f"{ctx.node_id}_{stream}"],
        "name": f"streamd {stream}",
        "manufacturer": "streamd",
    }
    if ctx.model_id:
        device["model"] = ctx.model_id
    if ctx.sw_version:
        device["sw_version"] = ctx.sw_version
    origin: dict[str, object] = {"name": "streamd"}
    if ctx.sw_version:
        origin["sw_version"] = ctx.sw_version
    configs: dict[str, dict[str, object]] = {}
    for component, key, options in entities:
        object_id = f"{stream}_{key}"
        entity_id = _ENTITY_ID_UNSAFE.sub("_", f"{ctx.node_id}_{object_id}".lower())
        topic = f"{ctx.discovery_prefix}/{component}/{ctx.node_id}/{object_id}/config"
        configs[topic] = {
            **options,
            "unique_id": f"{ctx.node_id}_{object_id}",
            "default_entity_id": f"{component}.{entity_id}",
            "availability_topic": f"{ctx.topic_prefix}/available",
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": device,
            "origin": origin,
        }
    return configs


def discovery_configs(streams: Iterable[str], ctx: DiscoveryContext) -> dict[str, bytes]:
    """Every stream's discovery configs, encoded: topic -> JSON payload (publish retained)."""
    return {
        topic: json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        for stream in streams
        for topic, payload in stream_configs(stream, ctx).items()
    }
