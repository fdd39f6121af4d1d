"""Worker-side OpenTelemetry: the ``flagship.run`` span of a call and spans of what runs inside it.

Set up from the ``OTEL_*`` environment at the worker's start (``routing.tracing.setup``); off
(nothing installed, nothing sent) without it. ``run``: the call's span, a child of the producer's
``flagship.call`` span through the message's ``traceparent`` header; ``dspy_spans``: DSPy's
callbacks as spans (modules, predictors, LM requests, tools, sandbox executes) and the LM
governor's attributes (tokens, cost, cache hit, rate-limit wait) on the LM request's span.
"""
