"""The ``gasnap`` command line."""
