"""`python -m blixard`: the same as the `blixard` command."""

from blixard.cli.main import main

main()
