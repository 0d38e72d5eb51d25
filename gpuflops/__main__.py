"""`python -m gpuflops` runs the CLI."""

from gpuflops.cli import main

main()
