"""What the tests and the benchmarks both stand on: fakes of the services the gateway talks to, and the
real servers they need, run as throw-away processes.

    fake_vllm/       a fake OpenAI-compatible backend, like vLLM (also `python -m testing.fake_vllm`)
    fake_globus/     fakes of Globus Auth, Groups, Compute and Transfer, faithful at the HTTP boundary
    existing_function.py  the existing gateway's compute function, as the fake Compute runs it
    services/        Redis, PostgreSQL, Prometheus and nginx, each a real server in a subprocess
    ports.py, processes.py, loops.py  free ports, waiting on processes, the fastest event loop

`tests/` and `bench/` import this package, never each other; it imports neither of them, nor the
gateway (`proxy`), so that a fake can never agree with the gateway by sharing its code.
tests/test_layers.py checks all three rules.
"""
