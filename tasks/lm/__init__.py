"""Language models on the worker: provider LMs with retries and typed errors, history, the offline scripted LM.

May import ``routing`` and ``dspy``; nothing else in ``tasks``.
"""
