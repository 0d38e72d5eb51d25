"""The EU AI Act side: thresholds, reconciliation, program roll-ups and the audit report."""
