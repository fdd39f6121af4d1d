"""Pool kinds and their default concurrency, from code and from FLAGSHIP_POOLS; worker per-call tuning."""

from __future__ import annotations

import gc
import json
import logging
import threading
import time

import pytest
from celery import Celery

from routing import Client, Pool, PoolTable, Settings
from routing.broker.celery_config import (
    SENTINEL_TRANSPORT,
    SHARED_CLIENT_TRANSPORT,
    TLS_TRANSPORT,
    SharedClientChannel,
    celery_config,
)
from routing.pools import DEFAULT_CONCURRENCY, PoolKind
from tasks.local.stack import Stack
from tasks.worker.hooks import (
    GC_YOUNG_THRESHOLD,
    TASK_LOGGERS,
    Consumer,
    default_sandboxes,
    settle_heap,
    tune_worker,
)
from tasks.worker.settings import WorkerSettings

LM_THREADS, CPU_THREADS = DEFAULT_CONCURRENCY[PoolKind.LM], DEFAULT_CONCURRENCY[PoolKind.CPU]


def test_built_in_pools_are_sized_for_their_work() -> None:
    table = PoolTable.load(None)
    assert {p.name: (p.kind, p.concurrency) for p in table} == {
        "triage_pool": (PoolKind.LM, LM_THREADS),
        "rlm_pool": (PoolKind.LM, 8),  # LM-bound, capped: each running call holds a sandbox
        "analytics_pool": (PoolKind.CPU, CPU_THREADS),
    }
    assert LM_THREADS >= 32 and CPU_THREADS <= 4


def test_constructor_arguments_keep_working() -> None:
    assert (Pool("bench_pool", size=2, concurrency=2).kind, Pool("bench_pool", size=2, concurrency=2).concurrency) \
        == (PoolKind.CPU, 2)
    assert Pool("p").concurrency == CPU_THREADS
    assert Pool("p", kind=PoolKind.LM).concurrency == LM_THREADS
    assert Pool("p", kind="lm", concurrency=8).concurrency == 8  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pool("p", kind="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pool("p", concurrency=-1)


def test_pools_json_names_a_kind_and_gets_its_default() -> None:
    table = PoolTable.load(json.dumps({
        "new_lm": {"kind": "lm"},
        "new_plain": {"size": 1},
        "triage_pool": {"kind": "cpu"},           # a new kind brings its own default
        "rlm_pool": {"concurrency": 8},            # an explicit number keeps the kind
        "pinned": {"kind": "lm", "concurrency": 3},
    }))
    got = {p.name: (p.kind.value, p.concurrency) for p in table}
    assert got["new_lm"] == ("lm", LM_THREADS)
    assert got["new_plain"] == ("cpu", CPU_THREADS)
    assert got["triage_pool"] == ("cpu", CPU_THREADS)
    assert got["rlm_pool"] == ("lm", 8)
    assert got["pinned"] == ("lm", 3)
    assert PoolTable.load(table.to_json()).pools == table.pools  # the form handed to child processes


@pytest.mark.parametrize("bad", [{"p": {"kind": "gpu"}}, {"p": {"concurrency": 0}},
                                 {"triage_pool": {"concurrency": -2}}])
def test_pools_json_refuses_bad_kinds_and_thread_counts(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PoolTable.load(json.dumps(bad))


def test_sandboxes_stay_few_on_many_threaded_workers() -> None:
    assert default_sandboxes(LM_THREADS) == 2
    assert default_sandboxes(1) == 1


def test_task_info_lines_are_off_unless_asked_for() -> None:
    def task_log_enabled(env: dict[str, str]) -> bool:
        return WorkerSettings.from_env(env).task_log

    assert not task_log_enabled({})
    assert task_log_enabled({"FLAGSHIP_TASK_LOG": "1"}) and task_log_enabled({"FLAGSHIP_TASK_LOG": "true"})
    saved = {name: logging.getLogger(name).level for name in TASK_LOGGERS}
    try:
        conf = Celery(set_as_current=False).conf
        tune_worker(conf, task_log=False)
        assert all(not logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LOGGERS)
        assert conf.result_backend_thread_safe is True
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("celery").setLevel(logging.INFO)
        tune_worker(conf, task_log=True)
        assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in TASK_LOGGERS)
    finally:
        logging.getLogger("celery").setLevel(logging.NOTSET)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_redis_rediss_and_sentinel_urls_each_get_the_shared_client_transport() -> None:
    assert celery_config(Settings(), "redis://127.0.0.1:6379/0")["broker_transport"] == SHARED_CLIENT_TRANSPORT
    assert celery_config(Settings(), "rediss://127.0.0.1:6380/0")["broker_transport"] == TLS_TRANSPORT
    assert celery_config(Settings(), "sentinel://127.0.0.1:26379")["broker_transport"] == SENTINEL_TRANSPORT


def test_the_broker_channel_reuses_one_redis_client_and_still_delivers(stack: Stack) -> None:
    app = Celery("pools-test", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env(), stack.redis_url))
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, SharedClientChannel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.ping()
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        queue = conn.SimpleQueue("flagship.test.shared-client")
        try:
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1}
            message.ack()
        finally:
            queue.clear()
            queue.close()


def test_settled_worker_heap_is_frozen_and_collected_less_often() -> None:
    saved = gc.get_threshold()
    try:
        settle_heap(Pool("p"))
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= GC_YOUNG_THRESHOLD and gc.get_threshold()[1:] == saved[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


class _Hub:
    def __init__(self) -> None:
        self.soon: list[object] = []
        self.later: list[tuple[float, object]] = []

    def call_soon(self, fn: object) -> None:
        self.soon.append(fn)

    def call_later(self, delay: float, fn: object) -> None:
        self.later.append((delay, fn))


class _Dispatcher:
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_task_events_are_published_in_batches_and_a_lost_flush_is_rescheduled() -> None:
    consumer = Consumer.__new__(Consumer)  # only the event-batching part, no broker
    consumer.hub, consumer.event_dispatcher = _Hub(), _Dispatcher()
    for _ in range(5):  # a burst of events: one flush scheduled
        consumer.on_send_event_buffered()
    assert len(consumer.hub.soon) == 1
    consumer.hub.soon.pop()()  # the event loop schedules it ...
    [(delay, flush)] = consumer.hub.later
    assert delay == consumer.event_flush_s
    flush()  # ... and runs it
    assert consumer.event_dispatcher.flushes == 1
    consumer.on_send_event_buffered()
    assert len(consumer.hub.soon) == 1  # the next event schedules the next flush
    consumer._flush_due = time.monotonic() - 1  # that one was lost (event loop reset)
    consumer.on_send_event_buffered()
    assert len(consumer.hub.soon) == 2


def test_flower_sees_every_task_event(client: Client, sessions) -> None:
    seen: dict[str, set[str]] = {}
    ready, done = threading.Event(), threading.Event()

    def listen() -> None:
        with client.app.connection() as conn:
            handlers = {"*": lambda event: seen.setdefault(event["type"], set()).add(event.get("uuid", ""))}
            receiver = client.app.events.Receiver(conn, handlers=handlers)
            ready.set()
            while not done.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)
                except TimeoutError:  # no event for 0.5 s: look at ``done`` again
                    continue

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(5)
    time.sleep(0.5)  # the receiver's queue is bound
    try:
        session = sessions("triage_pool")
        ids = {session.submit("ping").id for _ in range(10)}
        kinds = ("task-received", "task-started", "task-succeeded")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(ids <= seen.get(kind, set()) for kind in kinds):
            time.sleep(0.05)
        for kind in kinds:
            assert ids <= seen.get(kind, set()), kind
    finally:
        done.set()
        listener.join(5)
