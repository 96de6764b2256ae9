"""The one error of ``spectra import`` and ``spectra audit`` on bad input (a one-line message)."""

from __future__ import annotations

from spectra.errors import SpectraError


class SourceError(SpectraError):
    """A BASE or SOURCE that cannot be imported: the message names the path and what was expected."""
