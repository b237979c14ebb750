"""Errors a user can act on. The CLI prints their message alone, without a stack trace."""


class RecsysError(Exception):
    """A problem with the user's input, configuration or warehouse, stated in one line."""


class ConfigError(RecsysError):
    """A configuration file or override is invalid."""


class InputError(RecsysError):
    """An input path or file cannot be read as the requested preset."""


class MissingTableError(RecsysError):
    """A table that an earlier pipeline step writes does not exist yet."""
