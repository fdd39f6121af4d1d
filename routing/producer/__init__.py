"""The producer side: a client that opens sessions and routes their calls.

One-way chain, nothing calls back up: ``client`` → ``session`` → ``handles`` →
``future`` → ``router`` → ``watch``. May import the rest of ``routing``; never
``tasks`` or ``dspy``.
"""
