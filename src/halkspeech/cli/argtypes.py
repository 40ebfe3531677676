"""argparse value types shared by every command's flags."""

from __future__ import annotations

import argparse
import copy
import math


def finite_float(text: str) -> float:
    """A float flag: "nan" and "inf" parse as floats, then slip past every range check (nan < 0 is False) and
    fail later as a traceback or a wait that never ends; refused here as a usage error instead."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


class DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it or there is none to say."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _default_text(action):  # argparse skips a flag without help altogether
            action = copy.copy(action)
            action.help = _default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not _default_text(action):
            return action.help
        return f"{text} ({_default_text(action)})"


def _default_text(action: argparse.Action) -> str:
    if not action.option_strings or action.default is None or action.default is False:  # 0 is a default
        return ""
    if action.nargs == 0 and action.const is False:  # a store_false flag: "(default: True)" reads as "on"
        return ""
    if isinstance(action.default, str) and action.default == argparse.SUPPRESS:
        return ""
    value = ",".join(map(str, action.default)) if isinstance(action.default, list | tuple) else action.default
    return f"default: {value}".replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """The parser of every command and subcommand (add_subparsers makes children of the parent's class)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
