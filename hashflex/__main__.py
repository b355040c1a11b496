"""`python -m hashflex`: the `hashflex` command, for a shell where the venv's bin folder is not on PATH."""

from hashflex.agent.cli.main import main

main()
