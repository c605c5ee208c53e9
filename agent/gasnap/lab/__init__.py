"""Disposable lab guests for the demo, the tests and the benchmarks."""
