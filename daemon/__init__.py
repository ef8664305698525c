"""The service: glue between Kafka, memory/ (persistence) and patching/ (the engine).

Where a correction goes:

    consumer.py   poll a batch; messages.py validates each event (bad ones to <topic>.dlq);
                  Store.record_batch stores the batch in one transaction; then offsets are committed
    worker.py     the serial patch loop: Store.next_mistake claims one, model.py trains and gates
                  its neuron (the one seam to patching/), the outcome is stored, then kept in the model
    publisher.py  a new version on shared storage when the kept patch set changed (scheduler.py runs it)
    service.py    wires them together: threads, signals, the model lock, systemd notify, /livez /metrics

Who owns each state change: a mistake's status, memory/lifecycle.py (through Store methods); the
neurons in the model, patching/engine.py; versions and LATEST, publisher.py and history.py
(rollback, revoke, export); Kafka offsets, consumer.py. settings.py is the only reader of settings.

    cli/     `patchd` itself: one module per command group, arguments and printing only
    tools/   the demo, the benchmarks, the local Kafka launcher and a private PostgreSQL
"""
