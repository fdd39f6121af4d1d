"""What the benchmarks share: a fake OpenAI-protocol LM server, stock Celery as a baseline, broker meters, reports.

May import ``routing`` and ``tasks.lm``; imported by ``tasks.bench`` and tests only.
"""
