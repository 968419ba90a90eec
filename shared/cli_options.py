"""Typer commands generated from options dataclasses: each option is declared once, on its field.

    @dataclass
    class Options:
        out: Path = opt(..., "where results go")                   # required: --out
        k: int = opt(8, "queries per round", "--queries", "-k")   # flag names as in typer.Option (default: --k)
        seed: int = opt(0, cli=False)                             # not an option: the field keeps its default
        loss: str = "kto"                                         # a plain field is an option without help

    @app.command("x")
    @from_options(Options)
    def x(options: Options) -> None:
        '''The command's help.'''

``opt(default, help, *flags, **keywords)`` is a dataclass field (``...``: no default, a required option; bool
fields are ``--flag/--no-flag`` unless flags say otherwise). Keywords: ``default_factory``; ``cli=False``;
``parse``, a function from the value typed on the command line to the field's value (a ValueError it raises is a
usage error on that option); ``cli_type`` and ``cli_default``, the option's type and default where they are not
the field's (what ``parse`` takes); the rest goes to ``typer.Option`` (``min``, ``envvar``, ...).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any

_OWN = ("help", "flags", "cli", "parse", "cli_type", "cli_default")


def opt(default: Any = MISSING, help: str | None = None, *flags: str, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A dataclass field that is a CLI option (see the module's docstring)."""
    default = MISSING if default is ... else default
    return field(default=default, default_factory=default_factory, metadata={"help": help, "flags": flags, **cli})


def comma_list(value: str) -> tuple[str, ...]:
    """A ``parse`` for comma-separated values: 'a, b,' -> ('a', 'b')."""
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _flag(f) -> str:
    return next((x for x in f.metadata.get("flags", ()) if x.startswith("--")), "--" + f.name.replace("_", "-"))


def from_options(options: type) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Decorates ``run(options_object)`` into a typer command with one option per field of the dataclass
    ``options``; help: run's docstring. As a group callback it does nothing when a subcommand is invoked."""
    import typer

    hints = typing.get_type_hints(options)
    cli_fields = [f for f in fields(options) if f.metadata.get("cli", True)]
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for f in cli_fields:
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else ...
        option = typer.Option(meta.get("cli_default", default), *meta.get("flags", ()), help=meta.get("help"),
                              **{k: v for k, v in meta.items() if k not in _OWN})  # fmt: skip
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=meta.get("cli_type", hints[f.name])))  # fmt: skip

    def decorate(run: Callable[[Any], Any]) -> Callable[..., Any]:
        def command(ctx, **values):
            if ctx.invoked_subcommand:
                return None
            for f in cli_fields:
                if "parse" in f.metadata:
                    try:
                        values[f.name] = f.metadata["parse"](values[f.name])
                    except ValueError as exc:
                        raise typer.BadParameter(str(exc), param_hint=_flag(f)) from exc
            return run(options(**values))

        command.__signature__ = inspect.Signature(params)
        command.__name__, command.__doc__ = run.__name__, run.__doc__
        return command

    return decorate
