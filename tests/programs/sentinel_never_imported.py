"""Named by a test as a program no worker lists: importing it would leave a file behind."""

import os
from pathlib import Path

Path(os.environ.get("FLAGSHIP_HOME", "."), "sentinel_never_imported.was_imported").write_text("imported")


class Anything:
    pass
