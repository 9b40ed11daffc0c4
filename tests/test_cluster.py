"""`sinkstream serve --replicas 2` on a local Ray Serve with a PostgreSQL store (tests/cluster_scenario.py),
run in a network namespace with only a loopback interface, so that nothing Ray binds is reachable from
outside the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pgserver

pytest.importorskip("ray.serve")
SCENARIO = Path(__file__).parent / "cluster_scenario.py"


def _namespace_unavailable() -> str | None:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return "unshare or ip is missing"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "cannot create a network namespace here (unshare -n needs CAP_SYS_ADMIN)"
    return pgserver.unavailable()


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    why = _namespace_unavailable()
    if why:
        pytest.skip(f"the cluster scenario cannot run: {why}")
    out = tmp_path_factory.mktemp("cluster") / "seen.json"
    cmd = f"ip link set lo up && exec {sys.executable} {SCENARIO} {out}"
    subprocess.run(["unshare", "-n", "sh", "-c", cmd], timeout=900, check=False)
    result = json.loads(out.read_text())
    assert "error" not in result, result
    return result


def test_sessions_stay_on_one_replica(seen):
    assert set(seen["statuses"]) == {200}
    assert len(seen["body_replicas"]) == 1 and len(seen["header_replicas"]) == 1, seen  # body field and header
    assert seen["header_turns"] == [1, 2, 3, 4, 5]  # the header alone names the session


def test_stock_clients_stay_on_one_replica_and_resume(seen):
    stock = seen["stock"]
    assert stock["chat_replicas"] == 1 and stock["responses_replicas"] == 1, stock
    assert stock["chat_cached"][0] == 0 and all(c > 0 for c in stock["chat_cached"][1:]), stock
    assert stock["responses_cached"][0] == 0 and all(c > 0 for c in stock["responses_cached"][1:]), stock


def test_two_sessions_decode_on_two_replicas(seen):
    assert len(seen["replicas"]) == 2 and seen["concurrent"] == [200, 200]
    assert seen["replicas_listed"] == seen["replicas"]  # /v1/replicas, through the router


def test_a_session_is_never_served_twice_at_once(seen):
    assert seen["busy"] == "session_busy"


def test_kill_9_mid_answer_loses_nothing(seen):
    f = seen["failover"]
    assert f["status"] == 200 and f["replica"] != f["killed"] and f["turns"] == 2
    assert seen["same_logprobs_as_twin"]  # continued from the last commit, as if nothing had failed
    assert seen["orphan_or_partial_snapshots"] == []
    assert seen["exit"] == 0
