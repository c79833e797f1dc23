"""`archipelago coordinator status` against a real server."""

from __future__ import annotations

import json

from coordinator.cli import main


def test_status_prints_version_and_islands(coordinator, capsys):
    coordinator.register("island-0")
    assert main(["status", "--address", coordinator.address, "--credential", "admin-secret",
                 "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["version"] == 0 and status["live_islands"] == ["island-0"]
    assert main(["status", "--address", coordinator.address, "--credential", "admin-secret"]) == 0
    out = capsys.readouterr().out
    assert "island-0" in out and "version" in out


def test_status_with_a_wrong_credential_fails_clearly(coordinator, capsys):
    assert main(["status", "--address", coordinator.address, "--credential", "nope"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().out
