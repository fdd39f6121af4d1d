"""The flagship run's tickets, gold labels and the long incident context built from them."""

from __future__ import annotations

from typing import Any

TRIAGE_SIGNATURE = "ticket -> category, urgency, action"
#: The triage program the demo runs: a user-style DSPy module of two predictors (examples/support_programs).
TRIAGE_PROGRAM = "support_programs.triage:SupportTriage"
RLM_SIGNATURE = "context, query -> output"
RLM_QUERY = "Identify the top two recurring issues and recommend next actions."

#: (ticket id, report, gold category, gold urgency)
TICKETS: list[tuple[str, str, str, str]] = [
    ("INC-101", "Since 09:12 UTC the checkout API returns 502 Bad Gateway for all customers in the EU and US "
                "regions; the storefront is effectively down and orders are failing.", "outage", "high"),
    ("INC-102", "Our November invoice shows we were charged twice for the Pro plan: two identical line items "
                "of USD 499. Please refund the duplicate charge.", "billing", "medium"),
    ("INC-103", "Feature request: it would be nice to export to CSV from the reporting dashboard so our "
                "finance team can build their own monthly reports.", "feature", "low"),
    ("INC-104", "Our workspace admin is locked out after the SSO migration; password reset emails never "
                "arrive and 2FA codes are rejected, so nobody can sign in.", "account", "high"),
    ("INC-105", "The mobile app shows the wrong order total after a discount code is applied, and it crashes "
                "when the cart holds more than 20 items.", "bug", "medium"),
]
HOLDOUT = ("HOLDOUT-02", "cannot update billing address")

#: Timeline notes of incidents that keep coming back (the RLM should find the top two).
TIMELINE = [
    "2026-10-03 09:14 category=outage checkout API 502s after deploy; database connection pool exhausted",
    "2026-10-03 11:40 category=billing invoice job retried after timeout; customers charged twice",
    "2026-10-09 08:02 category=outage checkout API 502s; database connection pool exhausted again",
    "2026-10-12 16:25 category=account SSO login loop after certificate rotation",
    "2026-10-15 10:51 category=billing duplicate charges from the retried invoice job",
    "2026-10-21 07:33 category=outage storefront down for all customers; connection pool saturated",
    "2026-10-28 13:09 category=bug discount code applied twice on the mobile cart",
    "2026-11-02 09:47 category=outage 502 storm during the traffic peak; pool size unchanged since June",
    "2026-11-05 12:18 category=billing refund queue backlog after duplicate invoice charges",
]

#: The context is repeated until it is at least this long (RLM keeps it in the sandbox, not the prompt).
context_min_chars = 60_000


def gold_labels() -> list[dict[str, str]]:
    return [{"ticket_id": t, "category": c, "urgency": u} for t, _, c, u in TICKETS]


def build_context(triaged: list[dict[str, Any]]) -> str:
    """One line per ticket (id, predicted labels, action, report) plus the timeline, repeated until long.

    Every line carries a ``category=`` tag, so code in the sandbox can count recurring
    issues by category; the model only ever sees the context's size and a preview.
    """
    tickets = [
        f"{item['ticket_id']} category={item['category']} urgency={item['urgency']} "
        f"report={item['report']!r} action={item['action']!r}"
        for item in triaged
    ]
    unit = "\n".join(tickets + TIMELINE)
    copies = max(2, -(-context_min_chars // len(unit)))
    return "\n".join(unit for _ in range(copies))
