"""Schemathesis against a live ``smartswitch serve``, reading the OpenAPI document the server itself serves.

Every check it has (no 5xx; statuses, content types, bodies, SSE events and headers as documented;
schema-valid input accepted and invalid input refused; 405 with a true ``Allow``; no answer without the
key) runs over every operation but ``/v1/events`` (a stream that never ends by itself). Model ids
are often real catalog ids, so switches, loads, sleeps and chats reach real sim engines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, Server

EXAMPLES_PER_OPERATION = 25
CONFIG = f"""
headers = {{ Authorization = "Bearer {API_KEY}" }}
request-timeout = 60

[dictionaries.models]
values = ["small", "fragile", "big"]

[parameters]
"path.model_id" = {{ dictionary = "models", probability = 0.3 }}
"query.target_model" = {{ dictionary = "models", probability = 0.3 }}
"body.target_model" = {{ dictionary = "models", probability = 0.3 }}
"body.model" = {{ dictionary = "models", probability = 0.5 }}

# Schemathesis's own lists, plus what this server answers for any request too large for its limits (the
# document lists 413 and 431 everywhere; a 5xx is still caught, by not_a_server_error).
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "431",
                     "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "431", "5xx"]
"""


def schemathesis_command() -> str:
    beside = Path(sys.executable).parent / "st"
    found = str(beside) if beside.exists() else shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return found


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    result = subprocess.run(
        [schemathesis_command(), "--config-file", str(config), "run", f"{server.url}/v1/openapi.json",
         "--checks", "all", "--exclude-path", "/v1/events", "--max-examples", str(EXAMPLES_PER_OPERATION),
         "--workers", "1", "--report", "junit", "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "Loaded specification" in output and "passed" in output
    assert "Traceback" not in server.log_path.read_text(errors="replace")
