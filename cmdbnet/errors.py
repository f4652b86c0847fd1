"""User-facing errors.

Anything a user can cause (a missing folder, a bad colour in a label, an unreadable
checkpoint) is raised as :class:`CmdbError`. The command line prints its message as one
line on stderr and exits non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CmdbError(Exception):
    """An error caused by input or environment, reported as one line without a traceback."""

    exit_code = 2


class ConfigError(CmdbError):
    """Settings that do not validate; the message already holds one line per bad field."""
