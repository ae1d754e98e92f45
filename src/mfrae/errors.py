"""Errors raised on bad user input. All derive from ValueError so callers can catch them together."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and what is wrong."""
