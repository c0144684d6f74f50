"""NeMo Gym 0.7.0's own answers, computed in its venv: run with that venv's python, JSON in on stdin, JSON out.

Input `{"cases": {name: [verify response, ...]}, "t_ppf": [[p, df], ...], "quantiles": [[[x, ...], q], ...]}`.
Output `{"cases": {name: {"status": int, "body": ...}}, "t_ppf": [float, ...], "quantiles": [float, ...]}`:
each case is POSTed to an app that serves `compute_aggregate_metrics` with no custom hooks the way NeMo Gym's
environment servers do (`app.post("/aggregate_metrics", response_model=AggregateMetrics)`,
`nemo_gym/base_environment_server.py:152-157`), so `body` is the server's JSON answer, serialization included;
`t_ppf` is `scipy.stats.t.ppf`, `quantiles` `pandas.Series.quantile`.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from nemo_gym.config_types import AggregateMetrics, AggregateMetricsRequest
from nemo_gym.reward_profile import compute_aggregate_metrics
from pandas import Series
from scipy import stats


def main() -> None:
    request = json.load(sys.stdin)
    app = FastAPI()

    async def aggregate_metrics(body: AggregateMetricsRequest) -> Any:
        return compute_aggregate_metrics(body.verify_responses)

    app.post("/aggregate_metrics", response_model=AggregateMetrics)(aggregate_metrics)
    cases = {}
    with warnings.catch_warnings(), TestClient(app, raise_server_exceptions=False) as client:
        warnings.simplefilter("ignore")  # NeMo Gym warns about uneven repeats and zero-width intervals
        for name, verify_responses in request.get("cases", {}).items():
            answer = client.post("/aggregate_metrics", json={"verify_responses": verify_responses})
            body = answer.json() if answer.status_code == 200 else answer.text
            cases[name] = {"status": answer.status_code, "body": body}
    json.dump({
        "cases": cases,
        "t_ppf": [float(stats.t.ppf(p, df)) for p, df in request.get("t_ppf", [])],
        "quantiles": [float(Series(xs).quantile(q)) for xs, q in request.get("quantiles", [])],
    }, sys.stdout)


if __name__ == "__main__":
    main()
