"""The error every config problem raises."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""
