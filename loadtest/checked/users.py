"""The locust users of a load test: ``traffic_user`` sends ``traffic.Traffic``'s requests, ``clock_user`` ticks
``traffic.Churn`` or ``memory.MemoryWatch`` on a clock, all ``FastHttpUser`` (gevent), so that the
load generator leaves the server the CPU; ``storm_user`` sends ``storm.Storm``'s requests on sockets of its own."""
from __future__ import annotations

from locust import FastHttpUser, User, between, constant, task

from loadtest.checked.memory import MemoryWatch
from loadtest.checked.storm import Storm
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


def clock_user(name: str, watch: Churn | MemoryWatch, host: str, interval_s: float,
               timeout_s: float) -> type[FastHttpUser]:
    """A locust user class named ``name`` (locust wants its classes' names distinct), one instance, that calls
    ``watch.tick`` with its client every ``interval_s`` seconds."""
    class ClockUser(FastHttpUser):
        fixed_count = 1
        wait_time = constant(interval_s)
        network_timeout = connection_timeout = timeout_s

        @task
        def tick(self) -> None:
            watch.tick(self.client)

    ClockUser.host = host
    ClockUser.__name__ = ClockUser.__qualname__ = name
    return ClockUser



def storm_user(storm: Storm, host: str, clients: int) -> type[User]:
    """A locust user class of ``clients`` instances, each sending ``storm``'s requests one after another, a pause of
    up to half a second between them."""
    class StormUser(User):
        fixed_count = clients
        wait_time = between(0, 0.5)

        @task
        def hang_up(self) -> None:
            storm.send()

    StormUser.host = host
    return StormUser
