"""Round-robin routing, the baseline multiplexed routing is compared with (``loraswap scale --routing round-robin``):
a Ray Serve request router (its alpha ``RequestRouter`` API) that sends each request to the next replica in turn,
whatever adapter it is for and however long the replicas' queues are."""
from __future__ import annotations

import itertools

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(RequestRouter):
    """Each call picks the next of the candidate replicas, ordered by replica id; a replica that refuses (its
    ``max_ongoing_requests`` reached) is passed over at the router's next call."""

    def initialize_state(self, **kwargs) -> None:
        self._turns = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda replica: replica.replica_id.unique_id)
        return [[ordered[next(self._turns) % len(ordered)]]]
