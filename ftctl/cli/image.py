"""ftctl image ... (placeholder until its issue lands)."""

import typer

app = typer.Typer(help="image commands.", no_args_is_help=True)
