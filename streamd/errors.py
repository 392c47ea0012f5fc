"""Exception hierarchy (third-party errors are converted to these at the boundary), exit codes."""

import enum


class StreamdError(Exception):
    """Base class of every error streamd raises on purpose."""


class ConfigError(StreamdError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SourceError(StreamdError):
    """A video source cannot be opened or read."""


class ModelError(StreamdError):
    """The model cannot be loaded or failed while scoring.

    Attributes:
        reason: Counted in ``streamd_model_errors_total{reason}`` (``unreachable``, ``busy``,
            ``rejected``, ``refused``, ``timeout``, ``error``).
        health: What ``/healthz`` says while this is the latest failure (None: nothing).
    """

    def __init__(self, message: str, *, reason: str = "error", health: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.health = health


class ExitCode(enum.IntEnum):
    """Process exit codes (spec.md); defined once, used by the CLI and the daemon."""

    OK = 0
    FAILURE = 1  # runtime failure: systemd restarts
    USAGE = 2  # bad arguments or an unreadable video (analyze)
    STARTUP = 3  # the model or the HTTP port failed at startup
    CONFIG = 78  # EX_CONFIG from sysexits.h: systemd's RestartPreventExitStatus=78
    INTERRUPTED = 130  # 128 + SIGINT: analyze stopped by Ctrl-C or SIGTERM
