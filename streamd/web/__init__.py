"""The review page, the JSON API, /metrics and /healthz on one ASGI server."""
