"""prefixkit.benchmarks: measurements too long for the tests, also as `pt-bench`."""
