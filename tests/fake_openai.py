"""The OpenAI-protocol test server lives in ``tasks.bench.helpers.fake_lm_server`` (benchmarks use it too)."""

from tasks.bench.helpers.fake_lm_server import Failure, FakeOpenAI, RecordedRequest

__all__ = ["FakeOpenAI", "RecordedRequest", "Failure"]
