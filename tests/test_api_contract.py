"""The OpenAPI document tells the truth: a property-based fuzz (schemathesis, every check it has) of a
live `sinkstream serve` on the tiny model finds no server error and no response or status outside the
document; schema-valid requests are accepted, schema-invalid ones refused (tests/fuzz/schemathesis.toml
says which statuses each may answer)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_model, tiny_tokenizer
from serverproc import Server
from sinkstream.models import export_model

CONFIG = Path(__file__).parent / "fuzz" / "schemathesis.toml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = export_model(tiny_model("llama", layers=2), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "tiny")
    srv = Server(model, tmp_path_factory.mktemp("fuzz") / "s", "--max-completion-tokens", "64",
                 "--default-max-tokens", "16").start()  # fmt: skip
    yield srv
    srv.stop()


def test_405_names_every_method_of_the_path(server):
    status, body = server.request("PUT", "/v1/sessions/x", {})
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("OPTIONS", "/v1/sessions/x")
    r = conn.getresponse()
    assert r.status == 405
    assert {"GET", "DELETE"} <= {m.strip() for m in r.getheader("Allow").split(",")}


def test_schemathesis_finds_nothing(server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or pytest.skip("schemathesis missing")
    cmd = [cli, "--config-file", str(CONFIG), "run", server.url + "/openapi.json", "--seed", "4",
           "--output-sanitize", "false", "--report", "json", "--report-dir", str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    cases = report["test_cases"]
    print(f"schemathesis: {cases['generated']} requests generated, {cases['with_failures']} with failures")
    assert run.returncode == 0 and cases["with_failures"] == 0 and not report["errors"], run.stdout[-6000:]
    assert cases["generated"] > 500  # the run did fuzz every operation
