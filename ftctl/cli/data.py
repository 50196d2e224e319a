"""ftctl data ... (placeholder until its issue lands)."""

import typer

app = typer.Typer(help="data commands.", no_args_is_help=True)
