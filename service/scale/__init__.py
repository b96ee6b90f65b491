"""``loraswap scale``: the HTTP API served from several loraswap replicas on Ray Serve, each request routed to a
replica that holds its adapter. ``options`` (the command, light), ``app`` (the Ray Serve application and its run),
``router`` (the ingress: forwarding, admin changes sent to every replica, gathered metrics), ``replica`` (one
loraswap runtime and app, adapter affinity by Ray Serve's model multiplexing), ``routing`` (a request's adapter and
whether it changes the adapters), ``exchange`` (an HTTP request as data, and an ASGI app called in process),
``replica_metrics`` (the replicas' metrics in one scrape), ``round_robin`` (the baseline routing). Ray is an optional
extra: only ``options`` is imported without it.

Importing it keeps bitsandbytes' CPU logger to its errors, as ``loraswap serve`` does
(``server_process.quiet_bitsandbytes``), in every process of the application: a replica's or the router's imports this
package before its deployment's modules import peft, and bitsandbytes with it (a review: each replica and the router
said bitsandbytes' `pip install kernels` warning, which serve does not). In a process whose environment has
``WITHOUT_BITSANDBYTES`` (``app.build_app`` sets it for the router, and for the replicas of a full-precision base),
it marks bitsandbytes absent (``server_process.without_bitsandbytes``), as serve does: peft then does not import it
(a review: 44 MiB in each replica and in the router)."""
import os

from service.model.server_process import quiet_bitsandbytes, without_bitsandbytes
from service.settings import WITHOUT_BITSANDBYTES  # set to 1 for a Ray process that never quantizes

quiet_bitsandbytes()
if os.environ.get(WITHOUT_BITSANDBYTES) == "1":
    without_bitsandbytes()
