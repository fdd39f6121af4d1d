"""The OpenAI-protocol test server lives in ``tasks.local.fake_lm_server`` (benchmarks use it too)."""

from tasks.local.fake_lm_server import Failure, FakeOpenAI, RecordedRequest

__all__ = ["FakeOpenAI", "RecordedRequest", "Failure"]
