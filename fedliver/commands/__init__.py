"""Subcommands. Each module defines `register(subparsers)`, which adds its parser and sets
`run=<function(args) -> int>`; heavy imports stay inside `run` so `fedliver --help` is quick."""
