"""Subcommands of the ``aquilachat`` command line (see :mod:`aquilachat.cli`)."""
