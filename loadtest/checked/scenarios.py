"""The scenarios of ``loraswap loadtest``: how many adapters each serves, how traffic picks among them, how long each
user waits between requests, and whether an admin user churns the adapters. Light (no locust): the command's parser
lists them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One scenario. ``adapters``: how many adapters it derives and serves (``--adapters`` overrides it); ``zipf``:
    traffic picks adapter k (1-based) with probability proportional to 1 / k, else uniformly; ``wait_s``: each user
    waits uniformly between these seconds after each reply (0, 0: none, the offered load is as high as the users
    make it); ``churn``: an admin user unregisters an adapter and registers it again every ``--churn-interval``
    seconds while traffic uses it; ``storm``: a disconnect storm runs beside (``storm.Storm``) and the server's memory
    must stay flat after the warm-up."""

    name: str
    help: str
    adapters: int
    zipf: bool = False
    wait_s: tuple[float, float] = (0.0, 0.2)
    churn: bool = False
    storm: bool = False

    def weights(self, count: int) -> list[float]:
        """The probability of each of ``count`` adapters, in order (they sum to 1)."""
        raw = [1 / k if self.zipf else 1.0 for k in range(1, count + 1)]
        return [weight / sum(raw) for weight in raw]


SCENARIOS = {scenario.name: scenario for scenario in (
    Scenario("single", "one adapter", adapters=1),
    Scenario("uniform", "a uniform mix over the adapters", adapters=8),
    Scenario("zipf", "100 adapters picked by Zipf's law (s = 1): more than the resident slots, so they are evicted "
             "and loaded again", adapters=100, zipf=True),
    Scenario("churn", "an admin user unregisters an adapter and registers it again every second while traffic uses "
             "them", adapters=8, churn=True),
    Scenario("overload", "users that send back to back, far past capacity: 429 with Retry-After, then normal service "
             "once the load drops", adapters=2, wait_s=(0.0, 0.0)),
    Scenario("soak", "churn with a disconnect storm beside it (clients that hang up at random points, streams "
             "included), for as long as --duration: no wrong answer, no 5xx, memory flat after the warm-up",
             adapters=8, churn=True, storm=True),
)}
