"""The thin Typer layer: parses flags, calls the core, prints. No logic of its own."""
