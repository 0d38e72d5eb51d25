"""The persistent FLOPs ledger: hash-chained records, schema, store and the daemon's sink."""
