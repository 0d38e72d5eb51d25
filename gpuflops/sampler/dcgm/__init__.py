"""DCGM backend: bindings (the only importer of DCGM's Python modules), units, windows, sampler."""
