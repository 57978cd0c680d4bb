"""Fleet settings: `--node NAME=ADDRESS` (repeatable) or `--discover`, refused with a reason when they cannot work."""

from __future__ import annotations

import pytest

from quantrouter.cli import build_parser
from quantrouter.config import ConfigError, load_settings


def test_nodes_come_from_repeated_flags_or_one_variable() -> None:
    args = build_parser().parse_args(["serve", "--node", "a=10.0.0.1:50051", "--node", "b=10.0.0.2:50051"])
    from_flags = load_settings({"nodes": args.nodes}, {})
    from_env = load_settings({}, {"QUANTROUTER_NODES": "a=10.0.0.1:50051,b=10.0.0.2:50051"})
    assert from_flags.fleet.nodes == from_env.fleet.nodes == {"a": "10.0.0.1:50051", "b": "10.0.0.2:50051"}


@pytest.mark.parametrize(("flags", "message"), [
    ({"nodes": ["just-an-address:50051"]}, "NAME=VALUE"),
    ({"nodes": ["a=h:1"], "discover": "k8s://ns/svc"}, "set one of them"),
    ({"discover": "dns://ns/svc"}, "k8s://NAMESPACE/SERVICE"),
    ({"nodes": ["a=h:1"], "embedded": True}, "drop --embedded"),
    ({"node_stale_after": "1s", "node_report_interval": "2s"}, "must exceed"),
])
def test_settings_that_cannot_work_are_refused_with_a_reason(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(flags, {})
