"""schemathesis over ``/openapi.json`` of a live server: every operation called with generated
requests (valid and invalid) must answer without a server error (5xx), with a documented status
code and content type, and a body matching the documented schema.

A short bounded run (``CASELENS_SCHEMATHESIS_EXAMPLES`` examples per operation, default 6);
``benchmarks/serve_schema.py`` runs the same test with many more.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from serve_support import make_tokens, shared_home, start_server  # noqa: E402

from caselens.serve import ServeConfig  # noqa: E402

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

EXAMPLES = int(os.environ.get("CASELENS_SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home, _ = shared_home(tmp_path_factory)
    root = tmp_path_factory.mktemp("schema")
    (root / "incoming").mkdir()
    live = start_server(ServeConfig(home=home, encoder_threads=0, collections=("cases", "kb"), generator="extractive",
                                    rate_per_second=10_000, rate_burst=10_000, max_upload_bytes=1 << 20,
                                    ingest_roots=(root / "incoming",)), make_tokens(home, "-schema"))
    yield live
    live.stop()


def test_api_conforms_to_its_spec(served):
    """Each operation: valid requests, invalid requests, and valid requests naming a real collection."""
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    headers = served.headers("writer")
    failures: list[str] = []
    calls = [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        variants = [(schemathesis.GenerationMode.POSITIVE, None), (schemathesis.GenerationMode.NEGATIVE, None)]
        if "{name}" in operation.path:
            variants.append((schemathesis.GenerationMode.POSITIVE, {"name": "cases"}))
        for mode, path_parameters in variants:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case) -> None:
                calls[0] += 1
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

            try:
                check()
            except Unsatisfiable:  # no invalid request exists (e.g. negative mode of GET /api/health)
                continue
            except Exception as exc:  # noqa: BLE001 - every operation's failures are collected, then reported
                failures.append(f"{operation.label} [{mode.value}{' ' + str(path_parameters) if path_parameters else ''}]:"
                                f" {str(exc)[:1500]}")
    print(f"schemathesis: {calls[0]} requests")
    assert calls[0] >= 16 * 2
    assert not failures, "\n\n".join(failures)
