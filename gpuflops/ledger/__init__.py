"""The persistent FLOPs ledger: hash-chained store, reconciliation, thresholds, audit report."""
