"""A separate engine process for the crash test (tests/test_restart.py).

    python -m tests.engine_child CONFIG ENV_JSON PAYLOADS_JSON submit|recover

``submit``: submit every payload, print ``ACK <id>`` for each (after it is durable), then
``ACKED <n>`` and keep running until killed. ``recover``: open the engine (which recovers from the
ledger), print ``RECOVERED``, wait until every payment is final, print the statistics as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec
import trio

from engine.config import load_config
from engine.engine import Engine
from engine.model import Accepted


async def main(config_path: str, env: dict[str, str], work: list[list[object]], mode: str) -> None:
    config = load_config(config_path)
    async with Engine.open(config, environ=env) as engine:
        if mode == "submit":
            for payload, req in work:
                result = await engine.submit(msgspec.json.encode(payload), msgspec.json.encode(req))
                assert isinstance(result, Accepted), result
                print(f"ACK {result.id}", flush=True)
            print(f"ACKED {len(work)}", flush=True)
            await trio.sleep_forever()
        else:
            print("RECOVERED", flush=True)
            await engine.drain(timeout_s=120)
            print(msgspec.json.encode(engine.statistics()).decode(), flush=True)


if __name__ == "__main__":
    cfg, env_path, work_path, mode = sys.argv[1:5]
    env = json.loads(Path(env_path).read_text())
    work = json.loads(Path(work_path).read_text()) if mode == "submit" else []
    trio.run(main, cfg, env, work, mode)
