"""The errors a user can fix, apart from bugs.

Everything a person can act on (a bad config, a dataset or checkpoint that is missing or wrong, a service or
cache that cannot be reached) derives from `UserError`: the CLI prints those as one line. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message says what and where, without a traceback."""


class ConfigError(UserError, ValueError):
    """A config file, field or command-line option that cannot be used; the message names the field."""


class UnknownNameError(ConfigError):
    """A name that no registry holds (a teacher, student or method); the message lists the names it holds."""
