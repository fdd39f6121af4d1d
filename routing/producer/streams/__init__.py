"""Streamed module calls: the items, the one reader of every open stream, the iterators (``ModuleRef.stream``)."""

from routing.producer.streams.items import StreamChunk, StreamStatus
from routing.producer.streams.iterator import AsyncCallStream, CallStream
from routing.producer.streams.reader import StreamReader

__all__ = ["AsyncCallStream", "CallStream", "StreamChunk", "StreamReader", "StreamStatus"]
