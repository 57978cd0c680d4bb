"""Benchmarks and the policy simulator. Each `bench/<name>.py` exposes `main() -> None`; `python -m bench` runs them."""
