"""`python -m gpuflops.cli` runs the CLI (older benchmark scripts call it so)."""

from gpuflops.cli import main

main()
