"""The compile worker's child process: build the parent's model and compile both shape families
(compile_process.py says why), reading the parent's server args as JSON on stdin.

    python -m research_rt.executor.compile_worker PARENT_PID < server_args.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

ORPHAN_POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    """End this process once its parent (pid `parent`, passed in: the parent may die while this
    one still imports) is gone, killed without a chance to kill us: an orphan compile would hold a
    core for minutes."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="research_rt-orphan-watch").start()


def main() -> None:
    exit_with_parent(int(sys.argv[1]))
    import torch

    from research_rt.executor.model_runner import ModelRunner
    from research_rt.loader.model_loader import load_config
    from research_rt.loader.resolve import resolve_model_path
    from research_rt.server_args import ServerArgs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = ServerArgs(**json.load(sys.stdin))
    source = resolve_model_path(args.model_path)
    with torch.inference_mode():
        ModelRunner(args, source, load_config(source))  # compiles both families (warm_up)


if __name__ == "__main__":
    main()
