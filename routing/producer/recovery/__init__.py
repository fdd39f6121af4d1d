"""Finding calls that went astray: the orphan sweep, where a call is now, deadlines, backlog estimates.

``sweep`` finds hint calls left behind by a dead worker and resends them; ``whereabouts``
looks a call up in queues and un-acked records; ``deadlines`` keeps a call's deadline where
it waits; ``backlog`` estimates queue lengths for ``PoolSaturated``. May import
``routing.producer.results``, ``routing.producer.binding``, ``routing.fleet``,
``routing.broker`` and the contracts; never the producer modules above it.
"""
