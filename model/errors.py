"""The project's own error types: the command line prints their message as one line (exit 2).

They are ValueErrors, so callers that already catch ValueError keep working. Nothing heavy is
imported here: the command line uses them before torch loads.
"""
from __future__ import annotations


class NdpmoeError(ValueError):
    """An error raised on purpose: the message names the bad value, file or setting and what was
    expected, and is the whole story for the user."""


class CacheEntryError(NdpmoeError):
    """A cached or stored artefact that fails its check: unreadable, truncated, corrupted (its
    content hash differs from its seal) or not what the reader expects. Never used as it is."""
