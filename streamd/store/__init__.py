"""What streamd keeps for review: the event store (``events``), clips (``clips``, ``packets``).

Each part has one owner thread; importing this package imports neither SQLite's nor PyAV's
modules (``clips`` needs PyAV, loaded only when clips are recorded).
"""
