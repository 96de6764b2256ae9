"""spectra.cli: the ``spectra`` command (typer). Thin: parse, call the library, print."""
