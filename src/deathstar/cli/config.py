"""``deathstar config``: the config file's group of commands (today ``show``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from deathstar import config
from deathstar.cli.common import out
from deathstar.keys import CLIENT, resolve_dir

config_app = typer.Typer(help="The config file (config.toml in the config folder).",
                         no_args_is_help=True)


@config_app.command("show")
def show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every setting's value and where it came from (env > config file > default), the
    named clusters, and the key folder in use."""
    keys_dir = resolve_dir(None, CLIENT)
    settings = {k.lower(): {"value": v, "from": src}
                for k, (v, src) in sorted(config.SOURCES.items())}
    clusters = config.named_clusters()
    data: dict[str, Any] = {"config_file": str(config.config_path()), "settings": settings,
                            "clusters": clusters,
                            "keys": str(keys_dir) if keys_dir else None}
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    table = Table(title=f"deathstar settings ({data['config_file']})")
    for col in ("setting", "value", "from"):
        table.add_column(col)
    for name, row in settings.items():
        table.add_row(name, str(row["value"]), row["from"])
    for name, nodes in clusters.items():
        table.add_row(f"cluster {name}", ", ".join(nodes), "config file")
    table.add_row("keys", str(data["keys"] or "none"), "")
    out().print(table)
