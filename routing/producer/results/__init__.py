"""Results coming back: the producer's one reply listener and result decoding.

``listener`` subscribes to the producer's reply channel and settles each call's future;
``outcome`` decodes a stored or published result; ``listener_backend`` is the Celery
result backend that waits on the listener instead of polling. May import
``routing.broker`` and the contracts; nothing else of the producer.
"""
