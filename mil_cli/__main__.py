"""`python -m mil_cli`: the same as the `milcli` command."""

from mil_cli.cli import app

app()
