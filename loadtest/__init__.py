"""Load scenarios (locust) and the throughput benchmark for the loraswap service."""
