"""The locust users of a load test: ``traffic_user`` sends ``traffic.Traffic``'s requests, ``churn_user`` ticks
``traffic.Churn`` on a clock; both ``FastHttpUser`` (gevent), so that the load generator leaves the server the CPU."""
from __future__ import annotations

from locust import FastHttpUser, between, constant, task

from loadtest.checked.traffic import Churn, Traffic


def traffic_user(traffic: Traffic, host: str, wait_s: tuple[float, float], timeout_s: float) -> type[FastHttpUser]:
    """A locust user class that sends ``traffic``'s requests to ``host``, waiting uniformly ``wait_s`` seconds
    between them; a request unanswered after ``timeout_s`` seconds gets no reply (status 0)."""
    class TrafficUser(FastHttpUser):
        wait_time = between(*wait_s)
        network_timeout = connection_timeout = timeout_s

        @task
        def ask(self) -> None:
            traffic.send(self.client)

    TrafficUser.host = host
    return TrafficUser


def churn_user(churn: Churn, host: str, interval_s: float, timeout_s: float) -> type[FastHttpUser]:
    """A locust user class, one instance, that calls ``churn.tick`` every ``interval_s`` seconds."""
    class ChurnUser(FastHttpUser):
        fixed_count = 1
        wait_time = constant(interval_s)
        network_timeout = connection_timeout = timeout_s

        @task
        def tick(self) -> None:
            churn.tick(self.client)

    ChurnUser.host = host
    return ChurnUser
