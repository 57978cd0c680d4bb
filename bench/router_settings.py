"""`--setting NAME=VALUE` for the benchmarks that run quantrouter: a router setting by its config name, cast and
checked as its flag would be (`quantrouter.config.with_keys`), so that a figure taken with a knob away from its
default comes from a named, committed run rather than an edited tree."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from quantrouter.config import ConfigError, load_settings, with_keys
from quantrouter.policy import PolicyConfig
from quantrouter.server import policy_config


def add_setting_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a router setting for this run (e.g. {example}), cast and checked as its flag; repeat "
                             "for more. Use --out to keep the default results")


def settings_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """The `--setting` values by name; a malformed, unknown or invalid one ends the run with the usage, before any
    process starts."""
    if bad := [s for s in args.setting if "=" not in s]:
        parser.error(f"--setting wants NAME=VALUE, got {', '.join(bad)}")
    settings = dict(s.split("=", 1) for s in args.setting)
    try:
        with_keys(load_settings({}, {}), settings)
    except ConfigError as error:
        parser.error(str(error))
    return settings


def policy_with(settings: Mapping[str, str]) -> PolicyConfig:
    """The policy a router started with these settings (and every other at its default) decides by."""
    return policy_config(with_keys(load_settings({}, {}), settings).policy)
