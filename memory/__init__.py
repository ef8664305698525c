"""patchd's durable state (DESIGN §6): persistence only, no ML logic.

    store.py        the Store the daemon uses (its docstring lists the API)
    records.py      plain records crossing the daemon/store boundary (ReportIn, BatchResult, ...)
    lifecycle.py    mistake statuses, the legal transitions, the only code that changes a status
    schema.py       SQLAlchemy 2.0 models; migrations/ holds their Alembic history (migrate.py runs it)
    ingest.py       record_batch as set-based SQL; bulk.py the fast multi-row INSERT it uses
    policy.py       quorum, conflicts and the order mistakes are patched in
    engine.py       one engine per Store: SQLite (WAL, BEGIN IMMEDIATE) or PostgreSQL (psycopg 3)
    activations.py  activation memory set M and held-out locality set on disk (safetensors)
    fingerprint.py  input normalisation and the mistake fingerprint
    pgserver.py     a private PostgreSQL server for tests and `patchd bench store`
    bench.py        a synthetic correction stream with known answers; the store benchmark

Nothing is imported here, so `import memory.fingerprint` stays free of SQLAlchemy and torch.
"""
