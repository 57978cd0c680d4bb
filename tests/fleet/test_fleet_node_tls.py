"""The fleet reaches node routers that serve mutual TLS, dialling them by IP as discovery does, with
certificates made here by the openssl CLI. A fleet that lacks the CA, its client certificate or the
certificate's name leaves the node out, saying why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from quantrouter.client import RouterClient
from quantrouter.config import ConfigError
from quantrouter.fleet.server import fleet_in_thread
from quantrouter.fleet.server import node_settings as fleet_node_settings
from quantrouter.server import run_in_thread
from quantrouter.values import Completion, Decision
from tests.fleet.conftest import Node, fleet_settings, node_settings, wait_for
from tests.pki import Pki, make_pki
from tests.support import FAMILY

# The node's certificate names a Service, not the pod IP the fleet dials.
NODE_NAME = "node.quantrouter.test"
HANDSHAKE_WAIT_S = 15.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("node-pki"), server_names=f"DNS:{NODE_NAME}")


@pytest.fixture(scope="module")
def secure_node(nodes: dict[str, Node], pki: Pki) -> Iterator[str]:
    settings = node_settings(nodes["large"].backend, tls_cert=pki.server_cert, tls_key=pki.server_key,
                             tls_client_ca=pki.ca)
    with run_in_thread(settings, CollectorRegistry()) as running:
        yield f"127.0.0.1:{running.port}"


def test_the_fleet_routes_to_a_node_over_mutual_tls(secure_node: str, pki: Pki) -> None:
    settings = fleet_settings({"secure": secure_node}, node_tls_ca=pki.ca, node_tls_server_name=NODE_NAME,
                              node_tls_cert=pki.client_cert, node_tls_key=pki.client_key)
    with fleet_in_thread(settings, CollectorRegistry()) as fleet:
        wait_for(lambda: "secure" in fleet.router.nodes.live(), what="the TLS node's first report")
        with RouterClient(f"127.0.0.1:{fleet.port}") as client:
            events = list(client.generate(FAMILY, "The capital of France is", preference="latency"))
    decision, completion = events[0], events[-1]
    assert isinstance(decision, Decision) and decision.node == "secure"
    assert isinstance(completion, Completion) and completion.generated_tokens > 0


@pytest.mark.parametrize("missing", ["client certificate", "server name", "TLS"])
def test_a_fleet_that_cannot_complete_the_handshake_leaves_the_node_out(secure_node: str, pki: Pki,
                                                                        missing: str) -> None:
    overrides: dict[str, object] = {"node_tls_ca": pki.ca, "node_tls_server_name": NODE_NAME,
                                    "node_tls_cert": pki.client_cert, "node_tls_key": pki.client_key}
    if missing == "client certificate":
        del overrides["node_tls_cert"], overrides["node_tls_key"]
    elif missing == "server name":
        del overrides["node_tls_server_name"]
    else:
        overrides = {}
    with fleet_in_thread(fleet_settings({"secure": secure_node}, **overrides), CollectorRegistry()) as fleet:
        nodes = fleet.router.nodes
        wait_for(lambda: "unreachable" in nodes.down().get("secure", ""), HANDSHAKE_WAIT_S,
                 what="the failed handshake to be reported")
        assert "secure" not in nodes.live()
        assert "UNAVAILABLE" in nodes.down()["secure"]


def test_node_tls_files_that_cannot_be_read_are_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    settings = fleet_settings({"secure": "127.0.0.1:1"}, node_tls_ca=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match="cannot read a TLS file for the node connections"):
        fleet_node_settings(settings)
