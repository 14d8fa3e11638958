"""The `fedliver` command line: one subcommand per module in `fedliver.commands`."""
