"""The GPU measurement script, run here on the CPU with tiny models, in a process that cannot import
anything the GPU machine lacks (it has torch, transformers and safetensors, and this repository).

The real run (fever-minilm in bfloat16, the 1B- and 8B-size configs on an H200) is
deploy/gpu-bench.sh; this proves that it runs unchanged and writes every figure it promises.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.tinybase import prepare

# what the daemon uses and the GPU machine does not have
ABSENT = ("structlog", "sqlalchemy", "kafka", "boto3", "botocore", "cryptography", "alembic", "psycopg",
          "apscheduler", "prometheus_client", "daemon")  # fmt: skip

# an import of one of ABSENT made by this repository's code fails, as it would on the GPU machine
# (imports made inside transformers are its own business: it probes optional packages itself)
RUNNER = """
import os, sys
absent = set(sys.argv[1].split(","))
repo = os.getcwd() + os.sep
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in absent:
            return None
        frame = sys._getframe(1)
        while frame is not None and "importlib" in frame.f_code.co_filename:
            frame = frame.f_back
        caller = frame.f_code.co_filename if frame is not None else ""
        if caller.startswith(repo) and ".venv" not in caller:
            raise ImportError(f"{name} is not on the GPU machine (imported by {caller})")
        return None
sys.meta_path.insert(0, Block())
from patching.eval import gpubench
sys.exit(gpubench.main(sys.argv[2:]))
"""


def test_the_gpu_script_runs_with_torch_and_transformers_only(tmp_path: Path) -> None:
    base, data = prepare(tmp_path / "tiny")
    carry = tmp_path / "carry"
    shutil.copytree(base, carry / "fever-minilm")  # the part that carries a real base, with a tiny one
    texts = [json.loads(line)["input"] for line in (data / "memory.jsonl").read_text().splitlines()]
    claims = {
        "memory": texts[:60],
        "heldout": texts[60:100],
        "edits": [{"input": t, "target": ("SUPPORTS", "REFUTES")[i % 2]} for i, t in enumerate(texts[100:140])],
    }
    (carry / "claims.json").write_text(json.dumps(claims))
    out = tmp_path / "gpu-bench.json"
    args = ["--carry", str(carry), "--out", str(out), "--device", "cpu", "--configs", "tiny-llama"]
    args += ["--steps", "5", "--edits", "2", "--memory-rows", "300", "--reference-edits", "1", "--minilm-edits", "3"]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(ABSENT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32"  # auto on a CPU
    minilm = report["minilm"]
    assert minilm["dtype"] == "bfloat16" and minilm["cached"]["edits"] >= 1 and minilm["speedup"] > 0
    assert {(r["neurons"], r["batch"]) for r in minilm["inference_overhead"]} == {
        (n, b) for n in (1_000, 10_000) for b in (1, 16)
    }
    tiny = report["configs"]["tiny-llama"]
    assert "random weights" in tiny["weights"] and tiny["steps"] == 5 and tiny["memory_rows"] == 300
    assert tiny["cached"]["edits"] == 2 and tiny["reference"]["edits"] == 1
    assert all(r["steps"] == 5 for r in tiny["cached"]["rows"] if r["attempts"] == 1)  # exactly --steps
    assert set(report["targets"]) == {"minilm_ms_per_edit", "minilm_speedup"}  # no 8B config in this run
