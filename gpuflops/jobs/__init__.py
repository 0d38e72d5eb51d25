"""Job socket: the protocol (shared with the client library), the daemon's server and registry.

Deliberately empty: ``gpuflops.client`` imports ``gpuflops.jobs.protocol`` inside training jobs
and must not load the server, the registry or psutil with it.
"""
