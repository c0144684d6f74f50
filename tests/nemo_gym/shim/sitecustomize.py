"""Run NeMo Gym 0.7.0's example servers without Ray (imported by Python at start-up from `PYTHONPATH`).

`gym env start` and every server class without `ray_enabled` call `nemo_gym.server_utils.initialize_ray()`. A Ray
head here would listen on every interface (not only 127.0.0.1) and its worker ports overlap NeMo Gym's server port
range (10001-20000); none of the example servers uses Ray after start-up. So, in processes started with
`GYM_COLLECT_CONFORMANCE_NO_RAY=1` only, that one function becomes a no-op. No NeMo Gym file changes.
`nemo_gym.cli.env` imports the function by name, hence the patch happens before anything else imports NeMo Gym.
"""

import os

if os.environ.get("GYM_COLLECT_CONFORMANCE_NO_RAY") == "1":
    try:
        import nemo_gym.server_utils as _server_utils  # type: ignore[import-not-found]
    except ImportError:  # a Python without NeMo Gym (pip, the tool's own venv): nothing to patch
        pass
    else:
        def _no_ray() -> None:
            """Stands in for `initialize_ray`: Ray stays off in this test stack."""

        _server_utils.initialize_ray = _no_ray
