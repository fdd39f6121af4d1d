"""Redis Lua scripts, kept as files and registered once per client."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis import Redis
from redis.commands.core import Script


@cache
def source(name: str) -> str:
    return files("routing.broker").joinpath("scripts", f"{name}.lua").read_text()


class Scripts:
    """The scripts, registered on one Redis client (EVALSHA, falling back to EVAL)."""

    def __init__(self, redis: Redis) -> None:
        self.bind_session: Script = redis.register_script(source("bind_session"))
        self.rebind_session: Script = redis.register_script(source("rebind_session"))
        self.close_session: Script = redis.register_script(source("close_session"))
        self.touch_session: Script = redis.register_script(source("touch_session"))
