"""patchd's durable state (DESIGN §6): persistence only, all of it, and no ML logic.

Every query patchd makes is a method of the Store (store.py) or a function one of them calls;
nothing outside memory/ imports the tables or writes SQL (tests/test_layout.py checks it).

    store.py        the Store the daemon uses (its docstring lists the API)
    records.py      plain records crossing the daemon/store boundary (ReportIn, MistakeRecord, ...)
    status.py       the mistake statuses; lifecycle.py the legal transitions and the only code
                    that changes a status
    schema.py       SQLAlchemy 2.0 models; migrations/ holds their Alembic history (migrate.py runs it)
    ingest.py       record_batch as set-based SQL; bulk.py the fast multi-row INSERT it uses
    policy.py       quorum, conflicts, the order mistakes are patched in, the input a patch trains on
    summary.py      read-only counts: `patchd status`, backlog, mistakes by status
    engine.py       one engine per Store: SQLite (WAL, BEGIN IMMEDIATE) or PostgreSQL (psycopg 3)
    activations.py  activation memory set M and held-out locality set on disk (safetensors)
    lock.py         one daemon per model (a PostgreSQL advisory lock or a SQLite lock file)
    fingerprint.py  input normalisation and the mistake fingerprint
    copy.py         `patchd db copy`: every row into another database

Nothing is imported here, so `import memory.fingerprint` stays free of SQLAlchemy and torch.
"""
