"""Moving calls back onto a queue: to the end a worker pops next, in their send order, in one atomic step.

The reaper (a dead worker's direct queue and its un-acknowledged deliveries) and the
producer's orphan sweep (un-acked calls no live worker holds) move calls with
:func:`move_to_head`. Every item is read as raw bytes (``routing.broker.envelope.raw_command``)
and parsed defensively: one that is not an envelope (not UTF-8, not JSON, nested too deep, not
kombu's shape), and one delivered ``FLAGSHIP_MAX_DELIVERIES`` times without completing, is
dead-lettered with the reason, its removal and its dead letter in one transaction. The rest go
onto the target's head (kombu ``BRPOP``s the right end) in one script (``move_to_head.lua``),
the oldest send nearest the head: the route's ``sent_at``, else kombu's un-acked record time,
else queue order. The script takes only what is still as it was read, so a concurrent ack,
restore or pop is never duplicated; a source that changed is read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis as redis_lib
from redis import Redis

from routing.broker.deadletter import DELIVERIES_HEADER, DeadLetterSettings, Letter, announce, deliveries, record
from routing.broker.envelope import (
    NotAnEnvelope,
    UnackedKeys,
    envelope_problem,
    parse_item,
    raw_command,
    sent_at,
    text_or_none,
    unacked_keys,
    unacked_parts,
)
from routing.broker.scripts import source

log = logging.getLogger(__name__)

#: Items of a source queue read (and moved in send order) per pass; more are moved by the next passes.
batch_max = 5000
#: Passes over a source before a move gives up for now (each dead-letters bad items or retries a conflict).
max_passes = 50
#: Un-acked entries read per ``HSCAN`` page.
scan_count = 500
#: Whether an un-acked delivery is to be moved: ``wanted(delivery_tag, routing_key)`` (None: unreadable).
Wanted = Callable[[str, str | None], bool]


@dataclass(frozen=True)
class Move:
    """One message to move: where it is (an un-acked tag, or a place from the source's tail) and what is pushed."""

    payload: bytes
    #: (send time, 0 for un-acked / 1 for queued, sequence): the smallest is pushed last, nearest the head.
    order: tuple[float, int, int]
    read_as: bytes
    tag: bytes | None = None
    place: int | None = None


def retarget(message: dict[str, Any], queue: str, delivered: bool) -> bytes:
    """``message`` pointed at ``queue`` (a later redelivery goes there too).

    ``delivered``: a worker took it and did not complete it; that delivery is counted (and the message marked
    redelivered, as kombu's own restore does).
    """
    info = message["properties"]["delivery_info"]
    info["exchange"] = info["routing_key"] = queue
    if delivered:
        headers = message["headers"]
        headers[DELIVERIES_HEADER] = deliveries(headers) + 1
        headers["redelivered"] = info["redelivered"] = True
    return json.dumps(message).encode()


def unusable(message: Any, raw: bytes, queue: str | None, settings: DeadLetterSettings) -> Letter | None:
    """A dead letter for a taken message that cannot be moved: not an envelope, or at its delivery limit."""
    where = queue or "?"
    if message is None:
        return Letter(where, "un-acked entry is not kombu's JSON [message, exchange, routing_key]", raw)
    problem = envelope_problem(message)
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id, task = (text_or_none(headers.get("id")), text_or_none(headers.get("task"))) \
        if isinstance(headers, dict) else (None, None)
    if problem is not None:
        return Letter(where, problem, raw, task_id, task)
    count = deliveries(headers) + 1
    if count < settings.max_deliveries:
        return None
    return Letter(message["properties"]["delivery_info"]["routing_key"],
                  f"delivered {count} times without completing (limit {settings.max_deliveries}); "
                  "each time its worker died", raw, task_id, task, message["properties"].get("reply_to"))


def _dead_letter_one(redis: Redis, watched: str, still_there: Callable[[Redis], bool],
                     take: Callable[[Redis], None], letter: Letter, settings: DeadLetterSettings) -> None:
    """Remove one message and dead-letter it in one transaction (skipped if it is gone meanwhile)."""
    for _ in range(max_passes):
        with redis.pipeline() as pipe:
            try:
                pipe.watch(watched)
                if not still_there(pipe):
                    return
                pipe.multi()
                take(pipe)
                record(pipe, letter, settings)
                pipe.execute()
            except redis_lib.WatchError:
                continue
        announce(letter)
        return
    log.warning("could not dead-letter a message from %s (%s): %s changed on every try; the next pass retries",
                letter.queue, letter.reason, watched)


def unacked_moves(redis: Redis, wanted: Wanted, target: str, keys: UnackedKeys,
                  settings: DeadLetterSettings) -> list[Move]:
    """The wanted un-acked deliveries, to be moved to ``target``; those that cannot be are dead-lettered now."""
    moves: list[Move] = []
    cursor: Any = 0
    while True:
        cursor, page = raw_command(redis, "HSCAN", keys.hash, cursor, "COUNT", scan_count)
        for tag, raw in page.items():
            message, routing_key = unacked_parts(raw)
            if not wanted(tag.decode("utf-8", "replace"), routing_key):
                continue
            letter = unusable(message, raw, routing_key, settings)
            if letter is None:
                moves.append(Move(retarget(message, target, delivered=True), (sent_at(message) or 0.0, 0, len(moves)),
                                  raw, tag=tag))
                continue

            def still_there(pipe: Redis, tag: bytes = tag, raw: bytes = raw) -> bool:
                return bool(raw_command(pipe, "HGET", keys.hash, tag) == raw)

            def take(pipe: Redis, tag: bytes = tag) -> None:
                pipe.hdel(keys.hash, tag)
                pipe.zrem(keys.index, tag)

            _dead_letter_one(redis, keys.hash, still_there, take, letter, settings)
        if not int(cursor):
            break
    unsent = [m for m in moves if not m.order[0]]
    if unsent:  # no send time in the message: kombu's record time (when it was delivered) stands in
        pipe = redis.pipeline(transaction=False)
        for move in unsent:
            pipe.zscore(keys.index, move.tag)
        scores = dict(zip((m.tag for m in unsent), pipe.execute(), strict=True))
        moves = [replace(m, order=(float(scores.get(m.tag) or 0.0), *m.order[1:])) if not m.order[0] else m
                 for m in moves]
    return moves


def queue_moves(redis: Redis, source_key: str, target: str, settings: DeadLetterSettings) -> list[Move] | None:
    """The oldest ``batch_max`` items of ``source_key``, to be moved to ``target``.

    None when some could not be: those were dead-lettered, and the source is to be read again.
    """
    items = raw_command(redis, "LRANGE", source_key, -batch_max, -1)
    moves, bad = [], []
    for i, raw in enumerate(items):
        place = len(items) - 1 - i  # 0: the oldest, at the tail
        try:
            envelope = parse_item(raw)
        except NotAnEnvelope as wrong:
            bad.append((raw, Letter(source_key, wrong.problem, raw, wrong.task_id, wrong.task)))
            continue
        moves.append(Move(retarget(envelope, target, delivered=False),
                          (sent_at(envelope) or float("inf"), 1, place), raw, place=place))
    for raw, letter in bad:

        def still_there(pipe: Redis, raw: bytes = raw) -> bool:
            return raw_command(pipe, "LPOS", source_key, raw) is not None

        def take(pipe: Redis, raw: bytes = raw) -> None:
            pipe.lrem(source_key, -1, raw)

        _dead_letter_one(redis, source_key, still_there, take, letter, settings)
    return None if bad else moves


def push_to_head(redis: Redis, target: str, source_key: str | None, moves: list[Move], keys: UnackedKeys) -> int | None:
    """Take ``moves`` and push them onto ``target``'s head, oldest send nearest it; None if the source changed."""
    args: list[Any] = [sum(move.place is not None for move in moves)]
    for move in sorted(moves, key=lambda m: m.order, reverse=True):
        where = ("q", move.place) if move.place is not None else ("u", move.tag)
        args += [*where, hashlib.sha1(move.read_as).hexdigest(), move.payload]
    script = redis.register_script(source("move_to_head"))
    pushed = int(script(keys=[target, source_key or target, keys.hash, keys.index], args=args))
    return None if pushed < 0 else pushed


def move_to_head(redis: Redis, target: str, *, source_key: str | None = None, wanted: Wanted | None = None,
                 keys: UnackedKeys | None = None, settings: DeadLetterSettings | None = None) -> int:
    """Move everything in ``source_key`` and the ``wanted`` un-acked deliveries to ``target``'s head, in send order.

    What cannot be moved is dead-lettered. Returns how many were moved. Always returns: a source that keeps
    changing is left after ``max_passes`` (the next reap or sweep pass moves the rest).
    """
    keys = keys or unacked_keys()
    settings = settings or DeadLetterSettings.from_env()
    unacked = unacked_moves(redis, wanted, target, keys, settings) if wanted else []
    moved = 0
    for _ in range(max_passes):
        queued: list[Move] | None = []
        if source_key is not None and (queued := queue_moves(redis, source_key, target, settings)) is None:
            continue  # bad items were dead-lettered: read the rest again
        if not unacked and not queued:
            return moved
        pushed = push_to_head(redis, target, source_key, unacked + (queued or []), keys)
        if pushed is None:
            continue  # the source's oldest items changed meanwhile: read them again
        moved, unacked = moved + pushed, []
        if not queued:
            return moved
    log.warning("moving calls to %s stopped after %d passes (%s kept changing); the next pass moves the rest",
                target, max_passes, source_key)
    return moved
