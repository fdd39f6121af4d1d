"""The flagship run's steps, as a producer: everything below goes through ``routing`` sessions."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from routing import Client, Session, gather
from routing.errors import FlagshipError, NoCapableWorker, SessionWorkerUnavailable, UnknownProgram
from routing.producer.handles import ModuleRef
from tasks.local.demo.data import (
    HOLDOUT,
    RLM_QUERY,
    RLM_SIGNATURE,
    TICKETS,
    TRIAGE_PROGRAM,
    TRIAGE_SIGNATURE,
    build_context,
    gold_labels,
)

SKIP_MESSAGE = ("Deno not found on any rlm_pool worker; skipping RLM step "
                "(install Deno with `pip install deno` and run `python -m tasks.sandbox.setup`, then restart the "
                "rlm_pool workers).")
_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]")


@dataclass
class Options:
    lm: str | None = None
    triage_pool: str = "triage_pool"
    rlm_pool: str = "rlm_pool"
    analytics_pool: str = "analytics_pool"
    timeout_s: float = 300.0


@dataclass
class Hooks:
    """Called between steps (tests use it to kill a worker mid-run)."""

    after_step: Callable[[str, dict[str, Session]], None] = lambda step, sessions: None


@dataclass
class Console:
    """Where human-readable progress goes (nowhere in ``--json`` mode)."""

    say: Callable[[str], None] = print
    progress: Callable[[int, int], None] = lambda done, total: None


def preview(text: str, chars: int = 60) -> str:
    """A prompt's first ``chars`` characters, without DSPy's field markers."""
    return " ".join(_MARKER.sub(" ", text).split())[:chars]


@dataclass
class FlagshipRun:
    client: Client
    options: Options = field(default_factory=Options)
    console: Console = field(default_factory=Console)
    hooks: Hooks = field(default_factory=Hooks)
    sessions: dict[str, Session] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=lambda: {"rehydrations": []})

    def call(self, name: str, op: str, **kwargs: Any) -> Any:
        """A call that, if the session's strict worker died, rehydrates the session once and retries."""
        session = self.sessions[name]
        try:
            return session.call(op, timeout_s=self.options.timeout_s, **kwargs)
        except SessionWorkerUnavailable as exc:
            self.console.say(f"{name}: worker {exc.node} is gone; rehydrating the session once on a live worker")
            reply = session.call(op, timeout_s=self.options.timeout_s, rehydrate=True, **kwargs)
            self.console.say(f"{name}: rehydrated on {session.worker}; its refs were rebuilt from their recipes")
            self.report["rehydrations"].append({"session": name, "from": exc.node, "to": session.worker})
            return reply

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self.open_sessions()
            modules = self.prepare_triage()
            self.step("triage", lambda: self.triage(modules))
            self.step("rlm", self.rlm)
            self.step("analytics", self.analytics)
            self.step("holdout", lambda: self.holdout(modules["triage_1"]))
            self.history()
        finally:
            for session in self.sessions.values():
                session.close()
        self.report["elapsed_s"] = round(time.monotonic() - started, 3)
        return self.report

    def step(self, name: str, fn: Callable[[], None]) -> None:
        fn()
        self.hooks.after_step(name, self.sessions)

    def open_sessions(self) -> None:
        o = self.options
        for name, pool in (("triage_1", o.triage_pool), ("triage_2", o.triage_pool), ("analytics", o.analytics_pool)):
            self.sessions[name] = self.client.session(pool)
        try:
            self.sessions["rlm"] = self.client.session(o.rlm_pool)
        except NoCapableWorker:
            pass
        self.report["sessions"] = [
            {"name": name, "id": s.id, "pool": s.pool, "affinity": s.affinity.value, "worker": s.worker}
            for name, s in self.sessions.items()
        ]
        for item in self.report["sessions"]:
            self.console.say(f"session {item['name']:9s} {item['pool']:15s} {item['affinity']:13s} -> {item['worker']}")

    def prepare_triage(self) -> dict[str, ModuleRef]:
        modules = {}
        for name in ("triage_1", "triage_2"):
            session = self.sessions[name]
            lm = session.lm(self.options.lm, temperature=0.2)
            session.configure(lm)  # the session default LM, like dspy.configure(lm=...)
            try:  # the user-style program of examples/support_programs, when the workers list it
                modules[name] = session.program(TRIAGE_PROGRAM)
            except UnknownProgram:
                self.console.say(f"{TRIAGE_PROGRAM} is not on these workers (FLAGSHIP_PROGRAMS): "
                                 f"triage runs as dspy.Predict('{TRIAGE_SIGNATURE}')")
                modules[name] = session.predict(TRIAGE_SIGNATURE)
        self.report["lm"] = {"model": lm.model, "offline": lm.offline}
        if lm.offline:
            self.console.say(f"LM: {lm.model} -- OFFLINE mode: rule-based scripted answers, not a model "
                             "(set FLAGSHIP_LM or GEMINI_API_KEY, or pass --lm, for a real model)")
        else:
            self.console.say(f"LM: {lm.model}")
        return modules

    def triage(self, modules: dict[str, ModuleRef]) -> None:
        names = [("triage_1", "triage_2")[i % 2] for i in range(len(TICKETS))]
        futures = [modules[n].submit(ticket=report) for n, (_, report, _, _) in zip(names, TICKETS)]
        done = [0]

        def tick(_: object) -> None:
            done[0] += 1
            self.console.progress(done[0], len(futures))

        replies = gather(futures, timeout_s=self.options.timeout_s, on_done=tick)
        self.report["triage"] = []
        for name, future, out, (ticket_id, report, _, _) in zip(names, futures, replies, TICKETS):
            item = {"ticket_id": ticket_id, "report": report, "session": name, "worker": future.node,
                    "category": out.get("category"), "urgency": out.get("urgency"), "action": out.get("action"),
                    "latency_s": round((future.completed_at or 0) - future.submitted_at, 4), "score": None}
            self.report["triage"].append(item)
            self.console.say(f"{ticket_id} -> {item['category']}/{item['urgency']} ({name} @ {future.node})")

    def rlm(self) -> None:
        if "rlm" not in self.sessions:
            self.console.say(SKIP_MESSAGE)
            self.report["rlm"] = {"status": "skipped", "message": SKIP_MESSAGE, "answer": None}
            return
        session = self.sessions["rlm"]
        context = build_context(self.report["triage"])
        try:
            session.lm(self.options.lm, temperature=0.3)
            rlm = session.rlm(RLM_SIGNATURE, max_iters=4, max_llm_calls=12, max_output_chars=4000)
            self.console.say(f"RLM over {len(context):,} characters of context on {session.worker} ...")
            reply = self.call("rlm", "call", ref=rlm.ref_id, inputs={"context": context, "query": RLM_QUERY})
        except FlagshipError as exc:
            self.console.say(f"RLM step failed: {type(exc).__name__}: {exc}")
            self.report["rlm"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "answer": None}
            return
        trajectory = reply["trajectory"]
        self.report["rlm"] = {
            "status": "ok", "answer": reply["outputs"]["output"], "worker": reply["worker"],
            "iterations": trajectory["iterations"], "llm_calls": trajectory["llm_calls"],
            "elapsed_s": trajectory["elapsed_s"], "context_chars": len(context),
            "code": [step["code"] for step in trajectory["steps"]],
            "outputs": [step["output"] for step in trajectory["steps"]],
        }
        self.console.say(f"RLM answer ({trajectory['iterations']} iterations, {trajectory['llm_calls']} LM calls, "
                         f"{trajectory['elapsed_s']:.2f} s): {reply['outputs']['output']}")

    def analytics(self) -> None:
        predictions = [{k: t[k] for k in ("ticket_id", "category", "urgency", "latency_s")}
                       for t in self.report["triage"]]
        result = self.call("analytics", "score", predictions=predictions, gold=gold_labels())
        for item, score in zip(self.report["triage"], result["scores"]):
            item["score"] = score
        self.report["analytics"] = {k: result[k] for k in
                                    ("numpy_version", "mean", "std", "p80", "confusion", "accuracy", "latency",
                                     "scores", "worker")}
        self.console.say(f"analytics on {result['worker']} (numpy {result['numpy_version']}): mean {result['mean']:.3f}"
                         f"  std {result['std']:.3f}  p80 {result['p80']:.3f}")
        labels = result["confusion"]["labels"]
        self.console.say("confusion (rows gold, columns predicted): " + " ".join(f"{lab:>8s}" for lab in labels))
        for label, row in zip(labels, result["confusion"]["matrix"]):
            self.console.say(f"  {label:>8s} " + " ".join(f"{v:>8d}" for v in row))

    def holdout(self, module: ModuleRef) -> None:
        ticket_id, text = HOLDOUT
        reply = self.call("triage_1", "call", ref=module.ref_id, inputs={"ticket": text})
        out = reply["outputs"]
        labels = {k: out.get(k) for k in ("category", "urgency", "action")}
        self.report["holdout"] = {"ticket_id": ticket_id, "ticket": text, "session": "triage_1",
                                  "worker": reply["worker"], **labels}
        self.console.say(f"{ticket_id} -> {out.get('category')}/{out.get('urgency')} (triage_1 @ {reply['worker']})")

    def history(self) -> None:
        self.report["history"] = {}
        for name in ("triage_1", "triage_2", "rlm"):
            if name not in self.sessions:
                continue
            reply = self.call(name, "history", n=6)
            entries = [{"model": e["model"], "tokens": e["usage"]["total_tokens"], "cost": e["cost"],
                        "prompt_preview": preview((e["messages"] or [{"content": e["prompt_preview"] or ""}])[-1]
                                                  ["content"]), "offline": e["offline"]}
                       for e in reply["entries"]]
            self.report["history"][name] = {"worker": reply["worker"], "complete": reply["complete"],
                                            "entries": entries}
            self.console.say(f"history of {name} (on {reply['worker']}):")
            for e in entries:
                cost = "n/a" if e["cost"] is None else f"${e['cost']:.6f}"
                self.console.say(f"  {e['model']}  tokens {e['tokens']}  cost {cost}  {e['prompt_preview']!r}")
