"""The producer side: a client that opens sessions and routes their calls.

One-way chain, nothing calls back up: ``client`` → ``session`` → ``handles`` →
``future`` → ``router`` → ``recovery`` → ``results`` | ``watch``. ``fleet_map`` runs one
program over a dataset across a pool (``client.map``). Sub-rooms: ``recovery`` (lost calls
found and resent, deadlines, backlog estimates) and ``results`` (the reply listener and
result decoding). May import ``routing.fleet``, ``routing.broker`` and the contracts;
never ``tasks`` or ``dspy``.
"""
