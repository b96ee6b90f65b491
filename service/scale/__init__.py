"""``loraswap scale``: the HTTP API served from several loraswap replicas on Ray Serve, each request routed to a
replica that holds its adapter. ``options`` (the command, light), ``app`` (the Ray Serve application and its run),
``router`` (the ingress: forwarding, admin changes sent to every replica, gathered metrics), ``replica`` (one
loraswap runtime and app, adapter affinity by Ray Serve's model multiplexing), ``routing`` (a request's adapter and
whether it changes the adapters), ``exchange`` (an HTTP request as data, and an ASGI app called in process),
``replica_metrics`` (the replicas' metrics in one scrape), ``round_robin`` (the baseline routing). Ray is an optional
extra: only ``options`` is imported without it."""
