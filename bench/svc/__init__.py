"""The parts of bench/services.py: a Kubernetes Service's data path on loopback."""
