"""Redis and Celery/kombu plumbing: connections, TLS, the embedded server, the transport, results, scripts.

What lives here: URL reading and clients (``connect``, ``tls``, ``brokers``), the embedded
Valkey (``embedded``), the app's Celery settings (``celery_config``), the Redis transport
and its guards (``transport``, ``envelope``, ``drain``), the result store (``result_store``,
``result_acks``), dead letters (``deadletter``), claim-check storage (``claims``), the Lua
scripts (``scripts`` and ``scripts/*.lua``) and broker failures as typed errors (``failures``).

This is the one seam for kombu's and Celery's private names: every override of one lives
here (or in ``tasks.worker`` for the worker's consumer) and is listed in
``tests/test_upstream_seams.py``. May import the contracts (``routing.names``, ``errors``,
``settings``, ``pools``, ``validate``); never ``routing.fleet``, ``routing.producer``,
``tasks`` or ``dspy``.
"""
