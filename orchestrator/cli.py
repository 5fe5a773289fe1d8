"""The ``reso`` command line: a thin shell over the library (parse, call, print, exit code).

Human output goes to the terminal (stderr for progress), ``--json`` output to stdout. Each
subcommand lives in its own module and registers itself on :data:`app`.

Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, malformed file, bad checkpoint).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="reso",
    help="Reso-LLM agents: generate, chat, train, evaluate and run multi-agent scenarios.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Reso-LLM agents: generate, chat, train, evaluate and run multi-agent scenarios."""


def _register_commands() -> None:
    from . import generate_cmd

    generate_cmd.register(app)
    for module_name in ("chat_cmd", "train_cmd"):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module_name}":
                raise
            continue  # that command is not part of this build
        module.register(app)


_register_commands()


def main() -> None:  # pragma: no cover - console entry
    app()
