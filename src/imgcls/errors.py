"""Errors in the user's input. The CLI shows their message alone, without a traceback, and exits 2."""


class UserError(ValueError):
    """Bad input that the user can fix; the message names the key, file or value and what to do."""


class ConfigError(UserError):
    """A config value that cannot be built; the message names the key."""


class DataError(UserError):
    """A problem with the user's data tree, reported before any training starts."""
