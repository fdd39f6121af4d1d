"""One DSPy program over a dataset, across every live worker of a pool (``Client.map``).

What ``dspy.Evaluate`` or ``dspy.Parallel`` do on one machine, over the fleet: a
session per live worker builds the program once (its recipe), examples go out in
chunks that keep the worker's threads busy (each thread takes the chunk's next
example as it frees up), two chunks per worker in flight so a worker never idles
between them, results come back in input order. A chunk whose worker dies runs
again on another; per-item failures stay in place as typed errors.

A chunk ends when its slowest example does, so its threads idle for about half
an example's time at its end. By default a dataset is split evenly over the
workers, in equal chunks of at most ``max_examples_per_thread`` per thread (one
chunk per worker up to 512 examples on 64 threads): 1,000 examples over two
workers of 64 threads ran in 1.77-1.94 s (ideal 1.60 s), in chunks of one example
per thread in 2.34-2.74 s (``docs/benchmarks.md``). The price: a worker that dies
late takes its whole chunk with it, to run again elsewhere.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_any
from dataclasses import dataclass, field
from typing import Any

from routing import arguments, validate
from routing.errors import (
    CallTimeout,
    FlagshipError,
    InvalidArgument,
    NoCapableWorker,
    SessionWorkerUnavailable,
    error_from_json,
)
from routing.producer.future import CallFuture
from routing.producer.handles import LMRef, ModuleRef
from routing.producer.session import Session
from routing.program_state import read_state
from routing.validate import SizeLimits

#: Chunks each worker holds at once: one running, one queued behind it.
chunks_in_flight = 2
#: A default chunk's examples per thread of its worker, at most (a chunk holds at least one per thread).
max_examples_per_thread = 8


@dataclass
class MapResult:
    """Outputs in input order (a typed error in place of each failed example), and how the work spread."""

    outputs: list[Any]
    #: Examples each worker ran.
    per_worker: dict[str, int] = field(default_factory=dict)
    #: Failed examples by error type.
    failures: dict[str, int] = field(default_factory=dict)
    #: Chunks run again after their worker died.
    rerun_chunks: int = 0
    elapsed_s: float = 0.0
    #: What the run's LM calls used: calls, prompt_tokens, completion_tokens, cost_usd, cache_hits.
    usage: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Examples, time, each worker's count and share, failures by type and chunks rerun, as JSON."""
        total = max(1, len(self.outputs))
        return {"examples": len(self.outputs), "elapsed_s": round(self.elapsed_s, 3),
                "per_worker": {node: {"examples": n, "share": round(n / total, 3)}
                               for node, n in sorted(self.per_worker.items())},
                "failures": dict(self.failures), "rerun_chunks": self.rerun_chunks, "usage": dict(self.usage)}


@dataclass(frozen=True)
class ProgramSpec:
    """What every worker of a map builds once: a predict/chain_of_thought over a signature, or a program."""

    module: str = "predict"
    signature: str | dict[str, Any] | None = None
    instructions: str | None = None
    #: ``session.program`` arguments (``module == "program"``).
    path: str | None = None
    state: dict[str, Any] | None = None
    init: dict[str, Any] = field(default_factory=dict)
    #: ``session.lm`` arguments of the LM built for it (None: the session default).
    lm: dict[str, Any] | None = None

    def build(self, session: Session) -> ModuleRef:
        lm: LMRef | None = session.lm(**self.lm) if self.lm else None
        if self.module == "program":
            return session.program(str(self.path), state=self.state, lm=lm, **self.init)
        make = session.predict if self.module == "predict" else session.chain_of_thought
        return make(self.signature or "", lm=lm, instructions=self.instructions)


@dataclass(frozen=True)
class Job:
    """What one example becomes: the operation mapped, its item for a module ref, what a reply keeps."""

    op: str = "call"
    item: Callable[[ModuleRef, dict[str, Any]], dict[str, Any]] = lambda module, example: module.call_kwargs(example)
    keep: Callable[[dict[str, Any]], Any] = lambda ok: ok["outputs"]


class Worker:
    """One live worker's share of a map: its session and the program built there."""

    def __init__(self, session: Session, spec: ProgramSpec, slots: int) -> None:
        self.session = session
        self.module: ModuleRef = spec.build(session)
        self.slots = slots
        self.running: dict[CallFuture, int] = {}  # call in flight -> its chunk


def default_chunk_size(examples: int, workers: Sequence[Worker]) -> int:
    """Equal chunks, the same number for every worker, each at most ``max_examples_per_thread`` per thread.

    1,000 examples over two workers of 64 threads: one chunk of 500 each; 1,030: two of 258 each
    (not 512, 512 and a round for the last 6); 100 over four workers: 25 each (every worker used).
    """
    threads = max(1, min(w.slots for w in workers))
    count = max(1, len(workers))
    per_worker = max(1, math.ceil(math.ceil(examples / (max_examples_per_thread * threads)) / count))
    return max(1, math.ceil(examples / (count * per_worker)))


class FleetMap:
    def __init__(self, workers: list[Worker], examples: Sequence[dict[str, Any]], chunk_size: int | None,
                 on_progress: Callable[[int], None] | None = None, job: Job | None = None) -> None:
        self.job = job or Job()
        self.workers = workers
        self.examples = list(examples)
        size = chunk_size or default_chunk_size(len(self.examples), workers)
        self.chunks = [list(range(i, min(i + size, len(self.examples)))) for i in range(0, len(self.examples), size)]
        self.todo: deque[int] = deque(range(len(self.chunks)))
        self.on_progress = on_progress
        self.result = MapResult(outputs=[None] * len(self.examples))

    def run(self, timeout_s: float | None = None) -> MapResult:
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        done_chunks = 0
        while done_chunks < len(self.chunks):
            self._fill()
            if not self.workers:
                raise NoCapableWorker("the pool", ["a live worker (all died during the map)"])
            calls = [call for w in self.workers for call in w.running]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished, _ = wait_any(calls, left, FIRST_COMPLETED)
            if not finished:
                raise CallTimeout(self.workers[0].session.id, "map", timeout_s)
            for worker in list(self.workers):
                for call in [c for c in worker.running if c in finished]:
                    if worker not in self.workers:
                        break  # died: its other chunks went back to the queue
                    chunk = worker.running.pop(call)
                    if self._land(worker, chunk, call):
                        done_chunks += 1
        self.result.elapsed_s = time.monotonic() - started
        return self.result

    def _fill(self) -> None:
        """Top every worker up to ``chunks_in_flight``, a level at a time: first chunks go one per worker."""
        for level in range(1, chunks_in_flight + 1):
            for worker in list(self.workers):
                if self.todo and len(worker.running) < level:
                    chunk = self.todo.popleft()
                    items = [self.job.item(worker.module, self.examples[i]) for i in self.chunks[chunk]]
                    try:
                        call = worker.session.submit("map", op=self.job.op, items=items, num_threads=worker.slots)
                    except SessionWorkerUnavailable:  # died since its last chunk: this one was never sent
                        self.todo.appendleft(chunk)
                        self._drop(worker, [])
                        continue
                    worker.running[call] = chunk

    def _drop(self, worker: Worker, lost: list[int]) -> None:
        """A worker died: its chunks in flight (and ``lost``) go back to the front of the queue."""
        lost = [*lost, *worker.running.values()]
        self.workers.remove(worker)
        worker.running.clear()
        self.todo.extendleft(reversed(lost))
        self.result.rerun_chunks += len(lost)

    def _land(self, worker: Worker, chunk: int, call: CallFuture) -> bool:
        """Record a finished chunk; a chunk whose worker died goes back to the queue (returns False)."""
        try:
            replies = call.result(0)
        except SessionWorkerUnavailable:
            self._drop(worker, [chunk])
            return False
        node = worker.session.worker or "?"
        for index, entry in zip(self.chunks[chunk], replies):
            if "error" in entry:
                error: FlagshipError = error_from_json(entry["error"])
                self.result.outputs[index] = error
                self.result.failures[type(error).__name__] = self.result.failures.get(type(error).__name__, 0) + 1
            else:
                self.result.outputs[index] = self.job.keep(entry["ok"])
        self.result.per_worker = dict(Counter(self.result.per_worker) + Counter({node: len(replies)}))
        if self.on_progress is not None:
            self.on_progress(len(replies))
        return True


#: Keyword arguments ``Client.map``'s ``lm`` may name (those of ``session.lm``).
LM_ARGUMENTS = frozenset({"model", "temperature", "max_tokens", "api_base", "api_key", "default"})


def program_spec(limits: SizeLimits, op: str, path: Any, state: Any, init: Any, lm: Any) -> ProgramSpec:
    """A program's arguments for ``Client.map``/``evaluate``, checked before any session opens."""
    init = {} if init is None else init
    if not isinstance(init, dict):
        raise InvalidArgument(op, "init must be a dict of the program's constructor arguments")
    state = read_state(state)
    arguments.call_arguments("program", {"path": path, "init": init, "state": state}, limits)
    check_lm(op, lm, limits)
    return ProgramSpec("program", path=path, state=state, init=init, lm=lm)


def check_lm(op: str, lm: Any, limits: SizeLimits) -> None:
    if lm is not None:
        if not isinstance(lm, dict) or not set(lm) <= LM_ARGUMENTS:
            raise InvalidArgument(op, f"lm must be a dict of session.lm arguments ({sorted(LM_ARGUMENTS)})")
        arguments.call_arguments("lm", lm, limits)


def check_map_arguments(limits: SizeLimits, signature: Any, examples: Any, module: Any, lm: Any, instructions: Any,
                        chunk_size: Any, progress: Any, timeout_s: Any, program: Any = None, state: Any = None,
                        init: Any = None) -> tuple[list[dict[str, Any]], ProgramSpec]:
    """``Client.map``'s arguments checked before any session opens: the examples as a list, what to build."""
    if program is not None:
        if signature is not None:
            raise InvalidArgument("map", "give a signature or program=, not both")
        spec = program_spec(limits, "map", program, state, init, lm)
    else:
        if state is not None or init is not None:
            raise InvalidArgument("map", "state= and init= go with program=")
        validate.choice(module, "map", "module", ("predict", "chain_of_thought"))
        arguments.call_arguments(module, {"signature": signature, "instructions": instructions}, limits)
        check_lm("map", lm, limits)
        spec = ProgramSpec(module, signature, instructions, lm=lm)
    check_run_arguments("map", chunk_size, progress, timeout_s)
    items = validate.item_list(examples, "map", "examples")
    for example in items:
        validate.input_fields("map", example, limits, "an example")
    return items, spec


def check_run_arguments(op: str, chunk_size: Any, progress: Any, timeout_s: Any) -> None:
    if chunk_size is not None:
        validate.number(op, "chunk_size", chunk_size, 1, validate.max_items, integer=True)
    if progress is not None:
        validate.flag(progress, op, "progress")
    validate.timeout(timeout_s, op, "timeout_s")


def progress_bar(total: int, enabled: bool | None) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A rich progress bar on a terminal (``enabled=None``: only when stderr is one); returns (advance, stop)."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[bold]map", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
    task = bar.add_task("map", total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop
