"""Exception hierarchy: third-party errors are converted to these at the boundary."""


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
    """The model cannot be loaded or failed while scoring."""


class PublishError(StreamdError):
    """Events cannot be published."""
