"""NeMo Gym's vocabulary in one place: its config keys, the head server's document and routing through
environment servers, and the stamps on requests and results. The runner and the writer stay
protocol-agnostic.

    keys.py      0.7's collector keys this tool accepts but does not act on, and their notices
    head.py      the head server's document: agents, environment servers, addresses, `task_source`
    routing.py   which agent a row runs on and which server its `POST /run` goes to
    default_metrics.py  `/aggregate_metrics` as NeMo Gym's default computes it, for servers that cannot answer
    perf_summary.py     its `perf_summary` block, from the rollouts' `ng_perf`
"""
