"""The `mint` command's subcommands on finished runs: `ask`, `export`, `runs` (mint/cli.py dispatches)."""
