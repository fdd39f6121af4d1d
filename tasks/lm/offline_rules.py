"""What the offline LM answers: keyword triage of tickets, and RLM code that really inspects the context.

Every free-text answer is labelled ``[offline]``; RLM answers are built only from
what the analysis code printed in the sandbox.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from tasks.lm.offline_format import LABEL, fit, is_text

# -- triage rules ------------------------------------------------------------

#: category -> (default urgency, keywords, recommended action); order breaks ties.
_TRIAGE: dict[str, tuple[str, tuple[str, ...], str]] = {
    "outage": ("high", ("down", "outage", "502", "503", "504", "all customers", "every customer", "all users",
                        "unreachable", "not loading", "service unavailable"),
               "Page the on-call engineer, open an incident and post a status-page update."),
    "account": ("high", ("locked out", "password", "sso", "2fa", "mfa", "login", "log in", "sign in",
                         "verification code", "reset link"),
                "Verify the user's identity, restore access and check the identity-provider logs."),
    "billing": ("medium", ("invoice", "invoices", "charged twice", "double charged", "billing", "refund",
                           "payment", "credit card", "receipt", "subscription", "overcharged", "billing address"),
                "Route to the billing team to review the account's charges and correct them."),
    "bug": ("medium", ("error", "crash", "crashes", "crashed", "wrong", "bug", "broken", "incorrect",
                       "exception", "doesn't work", "does not work", "stack trace"),
            "Reproduce the defect, file a bug with the steps and attach logs."),
    "feature": ("low", ("would be nice", "feature request", "export to", "please add", "it would be great",
                        "could you add", "wish", "support for", "integration with"),
                "Log the request on the product backlog and thank the customer."),
}
_ESCALATE = ("urgent", "asap", "critical", "emergency", "immediately")
_DEESCALATE = ("no rush", "whenever", "low priority")


@functools.cache
def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![a-z0-9]){re.escape(word)}(?![a-z0-9])")


def _hits(text: str, words: tuple[str, ...]) -> list[str]:
    """Keywords present in the text as whole words (so "down" misses "download")."""
    return [w for w in words if _word_pattern(w).search(text)]


def triage_ticket(ticket: str) -> dict[str, Any]:
    """Rule-based triage: the category with most keyword hits, its default urgency, an action."""
    text = ticket.lower()
    matched = {cat: _hits(text, words) for cat, (_, words, _) in _TRIAGE.items()}
    best = max(_TRIAGE, key=lambda cat: len(matched[cat]))  # max() keeps the first of equals
    category = best if matched[best] else "bug"
    urgency = _TRIAGE[category][0] if matched[best] else "low"
    if _hits(text, _ESCALATE):
        urgency = "high"
    elif _hits(text, _DEESCALATE):
        urgency = "low"
    return {"category": category, "urgency": urgency, "action": _TRIAGE[category][2],
            "matched": {cat: hits for cat, hits in matched.items() if hits}}


def triage_values(ticket: str) -> dict[str, Any]:
    found = triage_ticket(ticket)
    why = "; ".join(f"{cat}: {', '.join(repr(h) for h in hits)}" for cat, hits in found["matched"].items())
    reasoning = (f"{LABEL} Rule-based keyword triage, not a model answer. Matched {why or 'no keywords'} "
                 f"-> category {found['category']}, urgency {found['urgency']}.")
    return {"category": found["category"], "urgency": found["urgency"],
            "action": f"{LABEL} {found['action']}", "reasoning": reasoning}


# -- RLM script ----------------------------------------------------------------

#: Incident theme -> (keywords searched in each log line, recommended next action).
_THEMES: dict[str, tuple[tuple[str, ...], str]] = {
    "database connection errors": (("database", "db ", "connection pool", "postgres", "mysql", "deadlock"),
                                   "raise the connection-pool limit and add an alert on pool saturation"),
    "upstream timeouts / 5xx": (("timeout", "timed out", "502", "503", "504", "gateway"),
                                "add retries with backoff and a circuit breaker on the slow upstream"),
    "memory pressure / OOM kills": (("out of memory", "oom", "memory"),
                                    "profile the leaking service and set memory limits with restarts"),
    "disk space exhaustion": (("disk", "no space", "volume full"),
                              "add log rotation and a disk-usage alert at 80 %"),
    "TLS certificate problems": (("certificate", "tls", "ssl"), "automate certificate renewal and expiry alerts"),
    "authentication failures": (("login", "auth", "sso", "401", "403", "token expired"),
                                "check the identity provider and token expiry settings"),
    "rate limiting": (("rate limit", "429", "throttl"), "raise quotas or smooth traffic with client backoff"),
    "queue backlog": (("queue", "backlog", "consumer lag"), "scale consumers and alert on queue depth"),
    "payment failures": (("payment", "billing", "invoice", "charge"), "escalate to the payments provider"),
    "cache failures": (("cache", "redis", "evict"), "size the cache and add a fallback on cache misses"),
    "deploy / config regressions": (("deploy", "rollback", "config", "release"),
                                    "add a canary stage and automatic rollback to deploys"),
}
_MARKER = "OFFLINE-SCRIPT"
_COUNT_LINE = re.compile(r"^COUNT (\d+) \| (.+?)\s*$", re.MULTILINE)
_LINES_LINE = re.compile(rf"^{_MARKER} analysed (\d+) non-empty lines", re.MULTILINE)

_ANALYSIS_CODE = '''\
# {label} scripted analysis: count recurring incident themes in `{var}`
import re
from collections import Counter

THEMES = {themes}
lines = [line.strip() for line in str({var}).splitlines() if line.strip()]
tagged = Counter()
for line in lines:
    found = re.search(r"(?:category|type|issue|kind)\\s*[=:]\\s*([\\w./-]+)", line, re.IGNORECASE)
    if found:
        tagged[found.group(1).lower()] += 1
counts, method = Counter(), "keyword themes"
if tagged and sum(tagged.values()) * 2 >= len(lines):
    counts, method = tagged, "tagged field"
else:
    for line in lines:
        low = line.lower()
        theme = next((name for name, words in THEMES if any(word in low for word in words)), None)
        if theme:
            counts[theme] += 1
print("{marker} analysed", len(lines), "non-empty lines of `{var}` by", method)
for theme, count in counts.most_common(5):
    print(f"COUNT {{count}} | {{theme}}")
'''


def rlm_analysis_code(var: str) -> str:
    """The Python the scripted LM writes for RLM's first step (runs inside the sandbox)."""
    if not var.isidentifier():
        raise ValueError(f"not a variable name: {var!r}")
    themes = "[\n" + "".join(f"    {(name, list(words))!r},\n" for name, (words, _) in _THEMES.items()) + "]"
    return _ANALYSIS_CODE.format(label=LABEL, var=var, themes=themes, marker=_MARKER)


def _context_var(variables_info: str) -> str:
    """The REPL variable to analyse: ``context`` if present, else the longest one."""
    found = re.findall(r"Variable: `(\w+)`.*?Total length: ([\d,]+)", variables_info, re.DOTALL)
    names = {name: int(size.replace(",", "")) for name, size in found}
    if "context" in names or not names:
        return "context"
    return max(names, key=names.__getitem__)


def _action_for(theme: str) -> str:
    """The recommended action for a counted theme or triage category."""
    if theme in _THEMES:
        return _THEMES[theme][1]
    if theme in _TRIAGE:
        return f"{theme}: {_TRIAGE[theme][2][0].lower()}{_TRIAGE[theme][2][1:].rstrip('.')}"
    return f"investigate the root cause of {theme!r}"


def _answer_from_counts(history: str) -> str | None:
    """Build the final answer from the counts the analysis code printed, or None if none were printed."""
    lines = _LINES_LINE.search(history)
    if not lines:
        return None
    counts = [(int(n), theme) for n, theme in _COUNT_LINE.findall(history)]
    if not counts:
        return f"{LABEL} Scripted REPL analysis of {lines.group(1)} log lines found no recurring issues."
    top = counts[:2]
    issues = " and ".join(f"{i}) {theme} ({n} occurrences)" for i, (n, theme) in enumerate(top, 1))
    actions = "; ".join(f"{i}) {_action_for(theme)}" for i, (_, theme) in enumerate(top, 1))
    return (f"{LABEL} Scripted analysis, not a model answer. Code run in the REPL over {lines.group(1)} log lines "
            f"counted the top recurring issues: {issues}. Recommended next actions: {actions}.")


def _submit(fields: dict[str, str], answer: str) -> str:
    """SUBMIT code: the answer goes to text outputs, typed outputs get typed placeholders."""
    args = ", ".join(f"{name}={(answer if is_text(kind) else fit(name, None, kind))!r}"
                     for name, kind in (fields or {"output": "str"}).items())
    return f"```python\n# {LABEL} scripted submit of the counts printed above\nSUBMIT({args})\n```"


def submit_fields(system: str) -> dict[str, str]:
    """RLM's final output fields and their types, from the action instructions' ``- {name}  # note`` lines."""
    head = system.split("You have access to a Python REPL environment")[0]
    fields = {}
    for name, note in re.findall(r"^\s*- \{(\w+)\}(?:\s+# note: the value you produce (.*))?$", head, re.MULTILINE):
        options = re.search(r"one of: (.*)$", note)
        fields[name] = (f"Literal[{', '.join(repr(o) for o in options.group(1).split('; '))}]" if options else
                        "bool" if "True or False" in note else
                        next((t for t in ("int", "float") if f"single {t} value" in note), None) or
                        ("list" if '"type": "array"' in note else "dict" if '"type": "object"' in note else "str"))
    return fields


def rlm_action(inputs: dict[str, str], fields: dict[str, str]) -> dict[str, Any]:
    """RLM action step: explore with code first, then SUBMIT what the printed counts say."""
    history = inputs.get("repl_history", "")
    step, _, last = inputs.get("iteration", "1/1").partition("/")
    answer = _answer_from_counts(history)
    if answer is not None:
        return {"reasoning": f"{LABEL} The REPL printed the theme counts; submitting the top two with actions.",
                "code": _submit(fields, answer)}
    attempts = history.count("=== Step ")
    if attempts >= 2 or step.strip() == last.strip() != "1":
        errors = re.findall(r"^\[Error\].*$", history, re.MULTILINE)
        reason = errors[-1][:200] if errors else "no counts were printed"
        return {"reasoning": f"{LABEL} The analysis code did not print counts; submitting that fact.",
                "code": _submit(fields, f"{LABEL} Scripted REPL analysis failed: {reason}")}
    var = _context_var(inputs.get("variables_info", ""))
    return {"reasoning": f"{LABEL} Step {step.strip()}: split `{var}` into lines, count recurring incident "
                         "themes with collections.Counter and print the counts before answering.",
            "code": f"```python\n{rlm_analysis_code(var)}```"}


def rlm_extract(inputs: dict[str, str]) -> dict[str, Any]:
    """RLM's extract fallback (max iterations reached): reuse any counts printed so far."""
    answer = _answer_from_counts(inputs.get("repl_history", ""))
    return {"answer": answer or f"{LABEL} RLM stopped before its analysis printed any counts."}
