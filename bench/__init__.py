"""Benchmark: the sidecar beside bare grpc.aio and aiohttp baselines (python -m bench)."""
