"""Which job a process works for: /proc and cgroups, environment, Kubernetes, Slurm, systemd."""
