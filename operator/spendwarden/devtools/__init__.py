"""Development tools that ship with the package: the mock upstream used by tests, the demo and benchmarks."""
