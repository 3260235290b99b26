"""Benchmarks (scripts, never timed tests); a package so tests and worker processes can import them."""
