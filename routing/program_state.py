"""A program's saved state, as a producer may give it: ``dump_state()``'s dict, ``save()``'s JSON text or file.

Read on the producer, sent as JSON, applied on the worker with DSPy's ``load_state``.
Pickle never travels: a ``save_program=True`` directory or a ``.pkl`` file is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from routing.errors import InvalidArgument


def read_state(state: Any) -> dict[str, Any] | None:
    """``state`` as the JSON object DSPy's ``load_state`` takes (None stays None)."""
    if state is None:
        return None
    if isinstance(state, dict):
        return state
    if isinstance(state, str) and state.lstrip().startswith("{"):
        return _parsed(state, "the state text")
    if isinstance(state, (str, os.PathLike)):
        path = Path(state)
        if path.is_dir():
            raise InvalidArgument("program", f"{path} is a save_program=True directory (pickled code): save the "
                                             "state with program.save('x.json') and pass that file instead")
        if path.suffix == ".pkl":
            raise InvalidArgument("program", f"{path} is a pickle: only JSON state travels (program.save('x.json'))")
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidArgument("program", f"state file {path} cannot be read ({exc.strerror or exc})") from None
        return _parsed(text, str(path))
    raise InvalidArgument("program", "state must be a dict from dump_state(), the JSON text of save('x.json'), "
                                     f"or a path to that file; got {type(state).__name__}")


def _parsed(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument("program", f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidArgument("program", f"{what} is not a JSON object of module state")
    return value
