"""What runs beside the service, never inside it: the demo, the benchmarks and local servers.

    broker.py        the one local Kafka launcher (deploy/kafka/broker.sh on free ports), shared by
                     the tests, the demo and the benchmarks
    pgserver.py      a private PostgreSQL server (Debian's binaries) for the tests and `bench store`
    demo.py, demo_report.py   `patchd demo`: producer, daemon, downstream client, summary
    bench_daemon.py  `patchd bench ingest | daemon`; bench_e2e.py `patchd bench e2e`;
    bench_store.py   `patchd bench store` and its synthetic correction stream

The service modules (daemon/*.py) never import these.
"""
