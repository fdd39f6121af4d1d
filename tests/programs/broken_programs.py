"""A program module that cannot be imported (a worker listing it must refuse to start)."""

raise RuntimeError("this program module is broken on purpose")
