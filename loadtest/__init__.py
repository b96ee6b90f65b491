"""Load scenarios (locust), the throughput benchmark, HTTP clients and A/B helpers for the loraswap service."""
