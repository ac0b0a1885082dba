"""The one exception type for mistakes in the user's input (config, files, data, mesh).

Subclasses (``ConfigError``, ``DataError``, ...) carry a one-line message naming what is wrong
and where; the CLI prints it and exits with status 2, without a traceback.
"""


class UserError(ValueError):
    """A user-caused error whose message is one line: what and where."""
