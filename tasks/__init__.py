"""Worker side: the Celery app, worker hooks, stateful DSPy operations and the CLI."""
