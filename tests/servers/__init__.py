"""Real registry servers for the tests and benchmarks, started on 127.0.0.1."""
