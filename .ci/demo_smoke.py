"""A plain install serves the demo end to end: serve -> ask -> answer -> SIGTERM -> exit 0.

Run by .ci/run with the interpreter of a virtualenv that has only ``pip install .`` (no extras):
``python .ci/demo_smoke.py``. Standard library only; the daemon uses its private demo Redis
(a state folder of its own, so nothing else on the machine is touched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ANSWER_WITHIN_S = 180.0


def main() -> int:
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "FLASHWATCH_STATE_DIR": state}
        env.pop("FLASHWATCH_REDIS_URL", None)
        log = Path(state) / "serve.log"
        with log.open("w") as out:
            serve = subprocess.Popen(
                [str(BIN / "flashwatch"), "serve", "--no-tui"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                answer = ask_until_answered(env, serve)
            finally:
                serve.send_signal(signal.SIGTERM)
                code = serve.wait(timeout=60)
        text = log.read_text()
        if answer is None:
            print(f"demo smoke: no answer within {ANSWER_WITHIN_S:g} s\n{text[-3000:]}")
            return 1
        if code != 0 or "Traceback" in text:
            print(f"demo smoke: serve exited {code} after SIGTERM\n{text[-3000:]}")
            return 1
        print(
            f"demo smoke: answered {answer['tokens']} tokens in {answer['latency_s']:.2f} s; exit 0"
        )
        return 0


def ask_until_answered(env: dict[str, str], serve: subprocess.Popen[bytes]) -> dict | None:
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while time.monotonic() < deadline and serve.poll() is None:
        result = subprocess.run(
            [str(BIN / "flashwatch"), "ask", "--json", "What is moving in the picture?"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            answer: dict = json.loads(result.stdout)
            if isinstance(answer.get("answer"), str) and answer.get("evidence"):
                return answer
        time.sleep(1.0)
    return None


if __name__ == "__main__":
    sys.exit(main())
