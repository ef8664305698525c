"""Prepared bases and tasks: build a base once (`patchd prepare NAME`), load it in a second, and
turn a task's splits into what the Patcher eats.

    load.py       LoadedBase, load_base (any local HF directory or a prepared name), cache paths
    prepare.py    `patchd prepare`: fine-tune fever-minilm, convert SmolLM2, tune it on ParaRel facts
    tasks.py      TaskAdapter: a loaded base's edits, memory and held-out batches, predictions
    datasets.py   the built-in tasks' splits (FEVER, zsRE, CounterFact) from ../shared/data
    templates.py, pararel.py, qa.py, qa_tuning.py   zsRE phrasings, ParaRel facts, QA prompting and tuning

The daemon needs load.py and tasks.py; the rest serves `patchd prepare` and `patchd evaluate`.
"""

import os

# no model hub, ever: every load below reads a local directory
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads that spin while waiting make small matmuls ~10x slower on a shared 2-core CPU
# (measured: an 11x576 @ 576x1536 product 28 ms spinning, 2 ms passive); it only takes effect if
# set before torch is first imported, hence here, in the package every base load goes through
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
