"""A user's program package, as the tests load it through the pool table's ``programs`` (and ``FLAGSHIP_PROGRAMS``)."""
