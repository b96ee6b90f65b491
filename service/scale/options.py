"""``loraswap scale``: its options and the command. Light (no Ray, no torch): ``loraswap`` builds its parser from
here; the run imports Ray, which is an optional extra (``pip install -e ".[scale]"``).

    loraswap scale --replicas 2 --port 8000                      # a Ray cluster of its own, on this machine
    loraswap scale --replicas 4 --port 8000 --address auto       # the cluster `ray start --head` began here
"""
from __future__ import annotations

import argparse

from service.cli.command import Command, nonnegative, positive, require_extra
from service.cli.settings_options import add_settings_arguments, settings_from

ROUTINGS = ("multiplexed", "round-robin")  # how the router picks a replica (service.scale.app.build_app)


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """``loraswap serve``'s options (each replica's settings, and the host and port the service listens on), and how
    to scale."""
    parser.add_argument("--replicas", type=positive(int), required=True, help="loraswap replicas, each with its own "
                        "base model, adapters and engine")
    parser.add_argument("--address", help="the Ray cluster to join: 'auto' for the one `ray start --head` began on "
                        "this machine, or its head's HOST:PORT (its GCS), or ray://HOST:PORT (its Ray Client server) "
                        "(with Ray's token authentication, its default, only where RAY_AUTH_MODE=token is set; over "
                        "TLS where RAY_USE_TLS is) (default: a Ray cluster of this machine alone, started and ended "
                        "with the command)")
    parser.add_argument("--routing", choices=ROUTINGS, default="multiplexed",
                        help="multiplexed: each request to a replica that holds its adapter (Ray Serve's model "
                        "multiplexing, at most --max-resident adapters a replica); round-robin: to each replica in "
                        "turn, whatever the adapter (the baseline it is measured against)")
    parser.add_argument("--replica-cpus", type=positive(float), default=1.0,
                        help="CPUs each replica reserves on its Ray node (Ray's logical resources)")
    parser.add_argument("--replica-gpus", type=nonnegative(float), default=0.0,
                        help="GPUs each replica reserves on its Ray node (1 for a replica of its own on each GPU)")
    add_settings_arguments(parser)


def run_scale(args: argparse.Namespace) -> None:
    """Run ``loraswap scale`` until interrupted; exit status 2 for invalid settings, settings no replica could start
    with (``preflight.check_scale``, before Ray starts) or when Ray Serve is not installed (``require_extra``)."""
    settings = settings_from(args)
    require_extra("scale", "ray", "ray.serve")
    from service.scale.preflight import check_scale

    check_scale(settings, args)
    from service.cli.command import naming
    from service.scale.app import ScaleConfig, serve_scaled

    serve_scaled(settings, ScaleConfig(args.replicas, args.routing, args.replica_cpus, args.replica_gpus, args.address),
                 naming(args))


SCALE = Command("serve the HTTP API from several replicas on Ray Serve, each request routed to a replica that holds "
                "its adapter", add_scale_arguments, run_scale, own_threads=True)
