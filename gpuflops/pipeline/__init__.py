"""The measuring pipeline: integrate activity into FLOPs, attribute them to processes, label
them with jobs and precisions, and hand committed rows to the counters."""
