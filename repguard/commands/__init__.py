"""One module per ``repguard`` subcommand."""
