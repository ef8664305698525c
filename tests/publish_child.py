"""The crash tests' publisher process (see tests/publishing.py Zygote).

Reads one line per publish from stdin: a step name to be killed at, or "-". Forks a child that
opens the store and the storage (a file system or S3), recovers and publishes with
PATCHD_FAULT_KILL_AT set to that step, and answers {"status": exit code, -9 when SIGKILLed}
on stdout once the child is gone.
"""

from __future__ import annotations

import json
import os
import sys


def _publish(spec: dict, kill_at: str) -> None:
    from daemon.publisher import FAULT_ENV, BaseInfo, Publisher
    from memory.store import Store
    from tests.media import open_spec

    if kill_at != "-":
        os.environ[FAULT_ENV] = kill_at
    store = Store.open(spec["database"], upgrade=False)
    publisher = Publisher(spec["model"], store, open_spec(spec["storage"]), BaseInfo(**spec["base"]), grace_s=0)
    publisher.recover()
    publisher.publish_if_changed()
    store.close()


def main() -> None:
    # imported before the first fork (lazy imports included), so each child only does the publish
    import alembic.runtime.migration  # noqa: F401
    import boto3  # noqa: F401
    import botocore.config  # noqa: F401
    import numpy  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sqlalchemy.dialects.sqlite  # noqa: F401
    import torch  # noqa: F401

    import daemon.publisher  # noqa: F401
    import memory.migrate  # noqa: F401
    import memory.store  # noqa: F401
    import patching.s3storage  # noqa: F401
    from daemon.logs import configure_logging

    configure_logging("WARNING", json=True, stream=sys.stderr)
    spec = json.loads(sys.argv[1])
    for line in sys.stdin:
        kill_at = line.strip()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _publish(spec, kill_at)
            except BaseException as exc:  # noqa: BLE001 - reported as the exit status
                print(f"publish failed: {exc!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
