"""Tools for agents (``dspy:ReAct`` with ``tools=["support_programs.tools:order_status"]``): plain functions."""

from __future__ import annotations

_ORDERS = {"A-17": "shipped on 2026-11-30, arriving Tuesday", "B-42": "refunded on 2026-12-01"}


def order_status(order_id: str) -> str:
    """The shipping status of an order, by its id (e.g. 'A-17')."""
    return _ORDERS.get(order_id.strip().upper(), f"no order {order_id!r}")


def refund_policy(category: str) -> str:
    """The refund policy that applies to a ticket category."""
    return "full refund within 30 days" if category == "billing" else "no refund applies"
