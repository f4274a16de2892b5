"""One error hierarchy: the CLI catches :class:`UserError` (print its one line, exit 2) and a search
tells a trial's user error (a bad weights path, a bad config value: the trial fails with that reason)
from a bug (a traceback worth reporting).

Every "fix your input" error of the core and the built-in plugins derives from :class:`UserError`;
third-party plugins should raise it (or a subclass) for the same purpose. ``UserError`` is also a
``ValueError``, so code that caught ``ValueError`` from a factory keeps working.
"""

from __future__ import annotations


class CxrAutomlError(Exception):
    """Base of every error cxr-automl raises on purpose."""


class UserError(CxrAutomlError, ValueError):
    """Bad input: a config value, a file, a dataset row, a plugin name. The message is one line that
    says what is wrong and what to do."""


class TrainingError(CxrAutomlError, RuntimeError):
    """A run that cannot go on for a reason of its own (a non-finite loss): the trial fails with the
    message, the search goes on."""
