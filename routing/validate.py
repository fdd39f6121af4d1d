"""Checks at every door: ids, TTLs, affinities, timeouts and call arguments, before anything is written or sent.

Pure functions (no Redis), used on both sides of the wire (the per-operation
argument table built from them is :mod:`routing.arguments`): by the producer
(``Client.session``/``attach``/``map``, ``Session.submit``, ref handles), so a bad
value fails before a record is written or a message sent, and by the worker's
allow-list, which is the authority (a producer with other settings, or a raw
Celery message, must not get past it). Every refusal is a typed error from
:mod:`routing.errors`, mostly ``InvalidArgument``.

Ids (session ids, ref ids): strings of 1 to :data:`max_id_chars` characters from
``[A-Za-z0-9._-]``. No ``:``, so no session id can name another session's
sub-key (``flagship:session:K`` vs ``flagship:session:K:recipes``). The ids the
system makes itself (uuid4 hex session ids, ``<kind>-<12 hex>`` ref ids) pass.

Sizes: each module input field (``call``'s ``inputs``, ``Client.map`` examples)
and each text argument of an operation is at most ``max_input_bytes``
(``FLAGSHIP_MAX_INPUT_BYTES``, 1 MiB); a long text belongs in
``session.context(text)``, bounded by ``max_context_bytes``
(``FLAGSHIP_MAX_CONTEXT_BYTES``, 64 MiB), as is any other single argument.
Strings count their UTF-8 bytes, other values their JSON.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kombu.utils import json as kombu_json

from routing.errors import InvalidArgument, UnknownPool, UnknownProgram
from routing.pools import Affinity, Pool, PoolTable
from routing.settings import Settings

#: Longest session or ref id.
max_id_chars = 128
_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{max_id_chars}}}")
#: kombu's JSON, as a message carries it (its ``__json__`` hook); untyped upstream.
_dumps: Callable[[Any], str] = kombu_json.dumps


def json_size(value: Any, limit: int) -> int:
    """About how many bytes of JSON ``value`` takes; counting stops once past ``limit``."""
    if isinstance(value, str):
        if value.isascii() or len(value) >= limit:
            return len(value) + 2
        return len(_dumps(value))
    if isinstance(value, dict):
        size = 2
        for key, item in value.items():
            size += json_size(key, limit) + json_size(item, limit - size) + 2
            if size > limit:
                break
        return size
    if isinstance(value, (list, tuple)):
        size = 2
        for item in value:
            size += json_size(item, limit - size) + 1
            if size > limit:
                break
        return size
    reducer = getattr(value, "__json__", None)  # kombu's hook (e.g. a context ref handle)
    return json_size(reducer(), limit) if reducer is not None else 8

#: Longest worker node name (``name@host``).
max_node_chars = 255
#: Session TTL bounds: at least a millisecond (Redis expiries are in ms), at most 30 days.
min_ttl_s = 0.001
max_ttl_s = 30 * 24 * 3600.0
#: Most fields one module input may have (signatures have at most 32).
max_input_fields = 64
#: Most items one ``map`` message may carry, most threads it may use on the worker.
max_items = 10_000
max_threads = 64
#: Operations that may not be mapped (they act on the session as a whole).
UNMAPPABLE = frozenset({"map", "release_session"})


class SizeLimits(Protocol):
    """What the size checks read (``routing.settings.Settings`` provides it)."""

    @property
    def max_input_bytes(self) -> int: ...

    @property
    def max_context_bytes(self) -> int: ...


@dataclass(frozen=True)
class Limits:
    """Size limits on their own (defaults: :class:`~routing.settings.Settings`'s)."""

    max_input_bytes: int = Settings.max_input_bytes
    max_context_bytes: int = Settings.max_context_bytes


def show(value: Any) -> str:
    """A short repr for an error message (any object: a huge int's repr may itself raise)."""
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _seconds(value: Any) -> float | None:
    """A real number (not a bool) as a float (an int too big for one: infinity); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


# -- ids, pools, session options ------------------------------------------------


def identifier(op: str, what: str, value: Any) -> str:
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    raise InvalidArgument(op, f"{what} must be a string of 1 to {max_id_chars} characters from "
                              f"[A-Za-z0-9._-], got {show(value)}")


def operation_name(op: Any) -> str:
    if isinstance(op, str) and _ID.fullmatch(op):
        return op
    raise InvalidArgument(show(op), "an operation name must be a short string such as 'ping'")


def session_id(value: Any, op: str = "session") -> str:
    return identifier(op, "session id", value)


def ref_id(value: Any, op: str, what: str = "ref") -> str:
    return identifier(op, f"{what} (a ref id)", value)


def node(value: Any, op: str = "session") -> str:
    if isinstance(value, str) and 0 < len(value) <= max_node_chars and value.isprintable() and " " not in value:
        return value
    raise InvalidArgument(op, f"node must be a worker's node name (name@host), got {show(value)}")


def pool(value: Any, table: PoolTable) -> Pool:
    """The pool named ``value``; ``UnknownPool`` for anything else (a non-string too)."""
    if not isinstance(value, str):
        raise UnknownPool(show(value), sorted(table.pools))
    return table.get(value)


def ttl(value: Any, op: str = "session", name: str = "ttl_s") -> float:
    seconds = _seconds(value)
    if seconds is not None and min_ttl_s <= seconds <= max_ttl_s:  # NaN fails both comparisons
        return seconds
    raise InvalidArgument(op, f"{name} must be a number of seconds between {min_ttl_s} and {max_ttl_s:.0f} "
                              f"(30 days), got {show(value)}")


def affinity(value: Any, op: str = "session") -> Affinity | None:
    """``None`` (the pool's default) or one of :class:`Affinity`, by value or member."""
    if value is None or isinstance(value, Affinity):
        return value
    if isinstance(value, str) and value in Affinity._value2member_map_:
        return Affinity(value)
    raise InvalidArgument(op, f"affinity must be one of {[a.value for a in Affinity]}, got {show(value)}")


def timeout(value: Any, op: str, name: str = "timeout") -> float | None:
    """``None`` (wait as long as it takes) or a positive, finite number of seconds."""
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None and 0 < seconds < math.inf:
        return seconds
    raise InvalidArgument(op, f"{name} must be None or a positive number of seconds, got {show(value)}")


def flag(value: Any, op: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidArgument(op, f"{name} must be True or False, got {show(value)}")


def choice(value: Any, op: str, name: str, allowed: Iterable[str]) -> str:
    options = list(allowed)
    if isinstance(value, str) and value in options:
        return value
    raise InvalidArgument(op, f"{name} must be one of {options}, got {show(value)}")


def number(op: str, name: str, value: Any, low: float, high: float, *, integer: bool = False,
           optional: bool = True) -> None:
    """Refuse a non-number (bools included), a float where an integer is due, or a value outside [low, high]."""
    if value is None and optional:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    typed = not isinstance(value, bool) and isinstance(value, kinds)
    if not typed or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(op, f"{name} must be {kind} between {low} and {high}, got {show(value)}")


#: ``"package.module:Name"`` (``"dspy:ReAct"`` too): a program, tool or metric a worker's configuration lists.
_PROGRAM_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
max_program_path_chars = 300


def program_path(op: str, name: str, value: Any) -> str:
    """A program path's form (what it names is the worker's to resolve); anything else is ``UnknownProgram``."""
    if isinstance(value, str) and len(value) <= max_program_path_chars and _PROGRAM_PATH.fullmatch(value):
        return value
    raise UnknownProgram(show(value), f"{name} of {op!r} must be 'package.module:Name' (or 'dspy:Module')")


def item_list(value: Any, op: str, what: str = "items") -> list[dict[str, Any]]:
    """A list (or other iterable, not a string or mapping) of keyword-argument dicts, as a list."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InvalidArgument(op, f"{what} must be a list of dicts, got {show(value)}")
    items = list(value)
    if not all(isinstance(item, dict) for item in items):
        raise InvalidArgument(op, f"each of {what} must be a dict of keyword arguments")
    return items


INPUT_SETTING = "FLAGSHIP_MAX_INPUT_BYTES; keep long texts with session.context(text)"


# -- sizes -------------------------------------------------------------------------


def size_bytes(value: Any, limit: int) -> int:
    """UTF-8 bytes of a string, JSON bytes of anything else; counting may stop once past ``limit``."""
    if isinstance(value, str):
        if value.isascii() or len(value) > limit or 4 * len(value) <= limit:
            return len(value)  # exact for ASCII; otherwise on the right side of the limit
        return len(value.encode("utf-8", "surrogatepass"))
    return json_size(value, limit)


def sized(op: str, name: str, value: Any, limit: int, setting: str) -> None:
    try:
        size = size_bytes(value, limit)
    except RecursionError:
        raise InvalidArgument(op, f"{name} nests too deeply to be sent as JSON") from None
    if size > limit:
        raise InvalidArgument(op, f"{name} is {size:,}+ bytes, over the limit of {limit:,} ({setting})")


def input_fields(op: str, inputs: Any, limits: SizeLimits, name: str = "inputs") -> None:
    """Module inputs: a dict of at most :data:`max_input_fields` fields, each within ``max_input_bytes``."""
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        raise InvalidArgument(op, f"{name} must be a JSON object of input fields, got {show(inputs)}")
    if len(inputs) > max_input_fields:
        raise InvalidArgument(op, f"{name} has {len(inputs)} fields (at most {max_input_fields})")
    for field, value in inputs.items():
        sized(op, f"input {field!r}", value, limits.max_input_bytes, INPUT_SETTING)


def field_names(value: Any, op: str, known: list[str] | None = None) -> list[str]:
    """A non-empty list of output field names (each one of ``known`` when that is given)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(op, f"fields must be a non-empty list of output field names, got {show(value)}")
    unknown = [v for v in value if known is not None and v not in known]
    if unknown:
        raise InvalidArgument(op, f"cannot stream {unknown}: not output fields of this module ({known})")
    return list(value)
