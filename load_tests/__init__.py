"""Load tests and benchmarks (locust, `offramp bench`). Benchmarks write files; they are not tests."""
