"""Security over real sockets: TLS and mutual TLS (certificates made here with the openssl CLI), bearer
tokens in metadata with health exempt, no prompt or generated text in logs or metric labels, and a
metrics port that binds apart from the gRPC port.
"""

from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from quantrouter.client import RouterClient
from quantrouter.embedded import EmbeddedServer
from quantrouter.server import RunningServer, run_in_thread
from quantrouter.v1 import router_service_pb2 as pb
from quantrouter.v1 import router_service_pb2_grpc as pb_grpc
from tests.hardening.helpers import generate_request, rich
from tests.pki import Pki, make_ca, make_leaf, make_pki
from tests.support import FAMILY, router_settings, scrape

TIMEOUT_S = 30.0
# A refused handshake fails fast; the deadline only bounds the wait for a channel that never connects.
HANDSHAKE_TIMEOUT_S = 5.0
TOKENS = ("first-token-8c41", "second-token-27be")
CANARY = "zebra-canary-4471 tell me about the secret plans"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def route_ok(channel: grpc.Channel) -> bool:
    decision = pb_grpc.RouterServiceStub(channel).Route(pb.RouteRequest(model=FAMILY), timeout=HANDSHAKE_TIMEOUT_S)
    return decision.decision.variant.startswith(FAMILY)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        route_ok(channel)
    code: grpc.StatusCode = raised.value.code()  # type: ignore[attr-defined]
    return code


def credentials(pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), key.read_bytes() if key else None,
                                        cert.read_bytes() if cert else None)


def test_tls(embedded_backend: EmbeddedServer, pki: Pki) -> None:
    settings = router_settings(embedded_backend, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with run_in_thread(settings, CollectorRegistry()) as running:
        target = f"127.0.0.1:{running.port}"
        with grpc.secure_channel(target, credentials(pki)) as channel:
            assert route_ok(channel)
        with RouterClient(target, credentials=credentials(pki)) as client:  # the client's own TLS channel
            assert client.route(FAMILY).chosen is not None
        with grpc.insecure_channel(target) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE  # plaintext never reaches the service
        untrusted = grpc.ssl_channel_credentials(pki.stranger_cert.read_bytes())  # not the server's CA
        with grpc.secure_channel(target, untrusted) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(embedded_backend: EmbeddedServer, pki: Pki) -> None:
    settings = router_settings(embedded_backend, tls_cert=pki.server_cert, tls_key=pki.server_key,
                               tls_client_ca=pki.ca)
    with run_in_thread(settings, CollectorRegistry()) as running:
        target = f"127.0.0.1:{running.port}"
        with grpc.secure_channel(target, credentials(pki, pki.client_cert, pki.client_key)) as channel:
            assert route_ok(channel)
            responses = list(pb_grpc.RouterServiceStub(channel).Generate(generate_request(FAMILY),
                                                                          timeout=TIMEOUT_S))
            assert responses[-1].HasField("completion")
        with grpc.secure_channel(target, credentials(pki)) as channel:  # no client certificate
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(target, credentials(pki, pki.stranger_cert, pki.stranger_key)) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_certificates_reload_when_their_files_change(embedded_backend: EmbeddedServer, pki: Pki,
                                                    tmp_path: Path) -> None:
    cert, key = tmp_path / "served.pem", tmp_path / "served.key"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    with run_in_thread(router_settings(embedded_backend, tls_cert=cert, tls_key=key), CollectorRegistry()) as running:
        target = f"127.0.0.1:{running.port}"
        with grpc.secure_channel(target, credentials(pki)) as channel:
            assert route_ok(channel)
        # Rotate to a certificate from a new CA, as a renewed Secret would be mounted.
        new_ca = make_ca(tmp_path, "rotated-ca")
        new_cert, new_key = make_leaf(tmp_path, "rotated", new_ca, "subjectAltName=IP:127.0.0.1,DNS:localhost")
        shutil.copyfile(new_key, key)
        shutil.copyfile(new_cert, cert)
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(new_ca[0].read_bytes())) as channel:
            assert route_ok(channel)  # a new handshake gets the new certificate, no restart
        with grpc.secure_channel(target, credentials(pki)) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE  # the old CA no longer vouches for it


def test_half_written_rotation_keeps_the_previous_certificates(embedded_backend: EmbeddedServer, pki: Pki,
                                                               tmp_path: Path) -> None:
    """Security: "a half-written rotation keeps the previous certificates". The fault is injected on
    purpose: the new key lands whole but its certificate only half written (as a copy in progress), then
    complete. New handshakes keep the old pair meanwhile, and take the new one once it is whole."""
    cert, key = tmp_path / "served.pem", tmp_path / "served.key"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    with run_in_thread(router_settings(embedded_backend, tls_cert=cert, tls_key=key), CollectorRegistry()) as running:
        target = f"127.0.0.1:{running.port}"
        new_ca = make_ca(tmp_path, "rotated-ca")
        new_cert, new_key = make_leaf(tmp_path, "rotated", new_ca, "subjectAltName=IP:127.0.0.1,DNS:localhost")
        shutil.copyfile(new_key, key)
        whole = new_cert.read_bytes()
        cert.write_bytes(whole[:len(whole) // 2])
        with grpc.secure_channel(target, credentials(pki)) as channel:
            assert route_ok(channel), "a half-written certificate replaced a working one"
        cert.write_bytes(whole)
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(new_ca[0].read_bytes())) as channel:
            assert route_ok(channel)


def test_token_from_the_environment(embedded_backend: EmbeddedServer) -> None:
    """Security: `QUANTROUTER_AUTH_TOKEN` alone (no token file) guards every call but health."""
    token = "env-token-5d02"
    settings = router_settings(embedded_backend, environ={"QUANTROUTER_AUTH_TOKEN": token})
    with run_in_thread(settings, CollectorRegistry()) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        listing = stub.ListVariants(pb.ListVariantsRequest(), metadata=(("authorization", f"Bearer {token}"),),
                                    timeout=TIMEOUT_S)
        assert listing.families
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListVariants(pb.ListVariantsRequest(), timeout=TIMEOUT_S)
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_OR_BAD_TOKEN")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def token_router(embedded_backend: EmbeddedServer, tmp_path: Path) -> Iterator[RunningServer]:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKENS[0]}\n\n{TOKENS[1]}\n")
    with run_in_thread(router_settings(embedded_backend, auth_token_file=token_file), CollectorRegistry()) as r:
        yield r


@pytest.mark.parametrize("metadata", [
    (),
    (("authorization", "Bearer wrong-token"),),
    (("authorization", f"Bearer {TOKENS[0]}x"),),
    (("authorization", TOKENS[0]),),  # no scheme
    (("authorization", f"Basic {TOKENS[0]}"),),
    (("authorization", f"Bearer {TOKENS[0]}"), ("authorization", f"Bearer {TOKENS[1]}")),  # ambiguous
], ids=["none", "wrong", "longer", "no-scheme", "basic", "two"])
def test_bearer_token_required(token_router: RunningServer, metadata: tuple[tuple[str, str], ...]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_router.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(generate_request(FAMILY), metadata=metadata, timeout=TIMEOUT_S))
        seen = rich(raised.value)
        assert (seen.code, seen.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_OR_BAD_TOKEN")
        assert "authorization: Bearer" in seen.message
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListVariants(pb.ListVariantsRequest(), metadata=metadata, timeout=TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_every_token_from_the_file_works_and_health_is_exempt(token_router: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_router.port}") as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        for token in TOKENS:
            metadata = (("authorization", f"Bearer {token}"),)
            responses = list(stub.Generate(generate_request(FAMILY), metadata=metadata, timeout=TIMEOUT_S))
            assert responses[-1].HasField("completion")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with RouterClient(f"127.0.0.1:{token_router.port}", token=TOKENS[1]) as client:  # the metadata the client sends
        assert client.list_variants(timeout=TIMEOUT_S).families


def test_prompts_and_generated_text_stay_out_of_logs_and_metrics(
        router: RunningServer, target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        responses = list(stub.Generate(generate_request(FAMILY, prompt=CANARY, num_predict=24), timeout=TIMEOUT_S))
        generated = "".join(r.chunk.text for r in responses if r.HasField("chunk")).strip()
        failing = [generate_request(CANARY), generate_request(f"{FAMILY}-q9", prompt=CANARY),
                   generate_request(FAMILY, prompt=CANARY, num_predict=-9)]
        for request in failing:  # errors are where text most often leaks
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(request, timeout=TIMEOUT_S))
        chat = pb.ChatRequest(model=FAMILY, messages=[pb.ChatMessage(role="user", content=CANARY)],
                              options=pb.GenerationOptions(num_predict=4))
        assert list(stub.Chat(chat, timeout=TIMEOUT_S))[-1].HasField("completion")
    assert len(generated) > len("the capital"), "too little text to look for"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert caplog.records, "nothing was logged at DEBUG: the check would be empty"
    exposed = scrape(router)
    for text in (CANARY, CANARY.split()[0], generated):
        assert text not in logged
        assert text not in exposed


def test_metrics_bind_apart_from_grpc(embedded_backend: EmbeddedServer) -> None:
    """127.0.0.2 is loopback too (127/8): metrics there are not served on the gRPC address."""
    with run_in_thread(router_settings(embedded_backend, metrics_address="127.0.0.2:0"),
                       CollectorRegistry()) as running:
        assert "quantrouter_in_flight_requests" in scrape(running, "127.0.0.2")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(running, "127.0.0.1")
