"""Real servers the tests and benchmarks need, each a throw-away process on a 127.0.0.1 port, all built
on one base (`base.ServiceProcess`): started, waited for until they answer, stopped, their log shown
when they fail.

    redis_server.py       Redis, which can go away and come back empty on the same port
    postgres_server.py    PostgreSQL, which comes back with its data; one database per test
    prometheus_server.py  Prometheus scraping a gateway, to evaluate the dashboard's queries
    nginx.py              nginx in front of a gateway, with the proxying rules the deployment ships
    rabbitmq_server.py    RabbitMQ, the broker Globus Compute pushes results through; keeps its data
"""
