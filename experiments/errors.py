"""Errors the CLI reports as usage errors (one line, exit code 2)."""


class ConfigError(ValueError):
    """A config value that is invalid, possibly only given the data (e.g. batch size)."""
