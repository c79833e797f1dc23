"""Transport security and the admin boundary, over real gRPC on loopback.

The certificates come from `archipelago coordinator certs`. With them the coordinator requires a
client certificate signed by the run's CA: a client presenting one works; one presenting none, one
signed by another CA, one speaking plaintext, or one that does not trust the server's CA never
reaches an RPC, and the run is left exactly as it was. Island tokens never open admin RPCs.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from archipelago.config import ConfigError
from archipelago.errors import UserError
from coordinator.cli import main
from coordinator.config import CoordinatorConfig
from coordinator.security import is_loopback, server_credentials
from coordinator.server import Coordinator
from island.job import load_job, open_client
from island.train import Trainer
from protos import archipelago_pb2 as pb
from tests.coordinator.conftest import ADMIN_CREDENTIAL, SMALL, TOKENS, CoordinatorHarness

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    assert main(["certs", "--out", str(out), "--hosts", "127.0.0.1,localhost", "--islands", "island-0,island-1"]) == 0
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with certificates for the same names."""
    out = tmp_path_factory.mktemp("other-certs")
    assert main(["certs", "--out", str(out), "--islands", "1"]) == 0
    return out


def files(folder: Path, client: str | None) -> dict[str, str]:
    """open_channel's keyword arguments: trust folder's CA, present its ``client`` certificate."""
    tls = {"ca": str(folder / "ca.crt")}
    if client is not None:
        tls |= {"cert": str(folder / f"{client}.crt"), "key": str(folder / f"{client}.key")}
    return tls


@pytest.fixture
def mtls(coordinator_factory: Callable[..., CoordinatorHarness], certs: Path) -> CoordinatorHarness:
    """A coordinator requiring client certificates; the harness's own channels use admin.crt."""
    return coordinator_factory(tls_cert=str(certs / "server.crt"), tls_key=str(certs / "server.key"),
                               tls_ca=str(certs / "ca.crt"), client_tls=files(certs, "admin"))


# ---- the certs command ---------------------------------------------------------------------------


def test_certs_writes_a_ca_server_and_client_certificates_with_private_keys(certs, capsys):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    for stem in ("ca", "server", "island-0", "island-1", "admin"):
        assert stat.S_IMODE((certs / f"{stem}.key").stat().st_mode) == 0o600, stem
        cert = x509.load_pem_x509_certificate((certs / f"{stem}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises unless the run's CA signed it
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    island = x509.load_pem_x509_certificate((certs / "island-0.crt").read_bytes())
    assert island.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "island-0"

    # A second call reuses the CA: new islands join the same run.
    ca_bytes = (certs / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(certs), "--islands", "island-2"]) == 0
    assert (certs / "ca.crt").read_bytes() == ca_bytes
    x509.load_pem_x509_certificate((certs / "island-2.crt").read_bytes()).verify_directly_issued_by(ca)
    assert "reused the CA" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--islands", "ca"], ["--islands", "a/b"], ["--islands", "x,x"],
                                  ["--hosts", ","], ["--days", "0"]])
def test_certs_refuses_bad_arguments(tmp_path, args):
    with pytest.raises(UserError):
        main(["certs", "--out", str(tmp_path), *args])
    assert not (tmp_path / "server.key").exists()


# ---- mutual TLS ----------------------------------------------------------------------------------


def test_a_client_with_a_valid_certificate_works_and_every_other_client_is_refused(mtls, certs, other_certs):
    c = mtls
    island = c.channel(tls=files(certs, "island-0"))
    lease = c.register("island-0")
    reply = c.send(c.push_parts(lease, round=0, base_version=0), channel=island)
    assert reply.accepted and reply.version == 1
    before = c.status()
    assert before.version == 1

    refused_clients = {
        "no client certificate": files(certs, None),
        "client certificate of another CA": {"ca": str(certs / "ca.crt"),
                                             "cert": str(other_certs / "island-0.crt"),
                                             "key": str(other_certs / "island-0.key")},
        "plaintext": {},
        "does not trust the server": files(other_certs, "island-0") | {"cert": str(certs / "island-0.crt"),
                                                                      "key": str(certs / "island-0.key")},
    }
    for what, tls in refused_clients.items():
        channel = c.channel(tls=tls)
        stub = c.stub(channel)
        register = pb.RegisterRequest(island_id="island-1", token=TOKENS["island-1"],
                                      config_hash=c.files.config_hash)
        calls = {
            "Register": lambda stub=stub, register=register: stub.Register(register, timeout=10),
            "PushPseudoGrad": lambda channel=channel: c.send(
                c.push_parts(lease, round=1, base_version=1), channel=channel),
            "Admin.Shutdown": lambda channel=channel: c.admin(channel).Shutdown(
                pb.AdminRequest(credential=ADMIN_CREDENTIAL), timeout=10),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == Code.UNAVAILABLE, (what, name, info.value.code(), info.value.details())
    after = c.status()
    assert after == before and after.version == 1
    assert [i.island_id for i in c.admin_status().islands] == ["island-0"]  # island-1 never registered


def test_status_cli_takes_the_ca_and_client_certificate(mtls, certs, capsys):
    address = mtls.address
    base = ["status", "--address", address, "--credential", ADMIN_CREDENTIAL]
    assert main([*base, "--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "admin.crt"),
                 "--tls-key", str(certs / "admin.key"), "--json"]) == 0
    assert '"version": 0' in capsys.readouterr().out
    assert main([*base, "--tls-ca", str(certs / "ca.crt")]) == 1  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_an_island_registers_over_mutual_tls_with_its_diloco_config(mtls, certs, data_cache):
    c = mtls
    job = load_job("ci", SMALL + [f"data.cache_dir={data_cache}", "diloco.reconnect_timeout_s=1",
                                  f"diloco.tls_ca={certs / 'ca.crt'}", f"diloco.tls_cert={certs / 'island-0.crt'}",
                                  f"diloco.tls_key={certs / 'island-0.key'}"])
    trainer = Trainer(job)
    client = open_client(job.diloco, trainer, c.address, "island-0", TOKENS["island-0"])
    try:
        client.connect()
        assert client.link.lease is not None and client.version == 0
    finally:
        client.close()
    job.diloco.tls_cert = job.diloco.tls_key = ""  # trusts the server, presents nothing
    client = open_client(job.diloco, trainer, c.address, "island-1", TOKENS["island-1"])
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.connect()
        assert info.value.code() == Code.UNAVAILABLE
    finally:
        client.close()
    assert [i.island_id for i in c.admin_status().islands] == ["island-0"]


# ---- plaintext must be asked for -------------------------------------------------------------------


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "192.168.0.4", "coordinator.example"]))


def test_plaintext_off_loopback_needs_insecure_and_always_warns(caplog):
    with pytest.raises(ConfigError, match="--insecure"):
        server_credentials(CoordinatorConfig(host="0.0.0.0"))
    for cfg in (CoordinatorConfig(host="0.0.0.0", insecure=True), CoordinatorConfig(host="127.0.0.1")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="coordinator.security"):
            assert server_credentials(cfg) is None
        assert "WITHOUT TLS" in caplog.text, cfg.host
    with pytest.raises(ConfigError, match="contradicts"):
        CoordinatorConfig(insecure=True, tls_cert="s.crt", tls_key="s.key")
    with pytest.raises(ConfigError, match="tls_key"):
        CoordinatorConfig(tls_cert="s.crt")


def test_serve_refuses_a_network_address_without_tls_or_insecure(run_files, tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address"):
        main(["serve", "--host", "0.0.0.0", "--port", "0", "--init", str(run_files.init),
              "--state-dir", str(tmp_path / "state")])
    assert not (tmp_path / "state" / "address").exists()


# ---- island tokens and the admin credential ------------------------------------------------------


def test_an_island_token_cannot_call_any_admin_rpc(coordinator):
    c = coordinator
    lease = c.register("island-0")
    before = c.status()
    admin = c.admin()
    token = TOKENS["island-0"]
    calls = {
        "Status": lambda: admin.Status(pb.AdminRequest(credential=token), timeout=10),
        "Checkpoint": lambda: admin.Checkpoint(pb.AdminRequest(credential=token), timeout=10),
        "Drain": lambda: admin.Drain(pb.DrainRequest(credential=token, island_id="island-0"), timeout=10),
        "Rollback": lambda: admin.Rollback(pb.RollbackRequest(credential=token, to_version=0), timeout=10),
        "Shutdown": lambda: admin.Shutdown(pb.AdminRequest(credential=token), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == Code.UNAUTHENTICATED, name
        assert "island tokens are not admin credentials" in info.value.details(), name
    assert c.status() == before
    assert c.stub().Heartbeat(pb.HeartbeatRequest(lease=lease), timeout=10).version == 0  # still serving
    assert {i.island_id: i.state for i in c.admin_status().islands} == {"island-0": "live"}


def test_an_admin_credential_equal_to_an_island_token_is_refused(run_files, tmp_path):
    cfg = CoordinatorConfig(state_dir=str(tmp_path / "state"), islands_file=str(run_files.islands_file),
                            admin_credential=TOKENS["island-1"])
    with pytest.raises(UserError, match="token of island 'island-1'"):
        Coordinator(cfg, run_files.init)
