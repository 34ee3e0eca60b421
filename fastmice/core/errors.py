"""The errors a user can act on: each message names the setting or file and says what to do.

The command line prints them as one line (no traceback) and exits with status 2.
"""


class ConfigError(ValueError):
    """A config value, override or combination of settings that cannot be used; the message names the key, the
    value and what is allowed."""


class DataError(ValueError):
    """A data source is missing, malformed or inconsistent; the message names the path."""
