"""Subcommands of the ``tampu`` command that are more than a few lines."""
