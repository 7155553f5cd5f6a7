"""A small but real payments system on the outbox kit.

    service.py    the payment service: payments table + outbox.publish, one transaction each
    ledger.py     the ledger service: consumes payment events, double-entry postings, exactly once
    schema.py     both services' tables (separate PostgreSQL schemas: payments, ledger)
    invariants.py the checks the demo and the tests run at the end
    demo.py       `make demo`: everything end to end, with progress bars and a summary
"""
