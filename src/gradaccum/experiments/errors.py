"""The one exception the CLI treats as the user's bad input (exit 2 with its message).

Anything else (a bug, an unexpected library error) keeps its traceback.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting, a file or a storage the user named cannot be used; the message says which and why."""
