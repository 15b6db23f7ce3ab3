"""The ``cabincrew`` command line."""
