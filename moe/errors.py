"""The one exception type for mistakes in the user's input (config, files, data, mesh).

Subclasses (``ConfigError``, ``DataError``, ...) carry a one-line message naming what is wrong
and where; the CLI prints it and exits with status 2, without a traceback.
"""


class UserError(ValueError):
    """A user-caused error whose message is one line: what and where."""


class Stopped(KeyboardInterrupt):
    """The process (or the job it launched) was stopped by signal ``signum`` (SIGINT, SIGTERM,
    SIGHUP); the CLI says so in one line and exits ``128 + signum`` (130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
