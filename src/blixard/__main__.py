"""`python -m blixard`: the same as the `blixard` command."""

from blixard.daemon.commands import main

main()
