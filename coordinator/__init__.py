"""coordinator: the service that merges islands' pseudo-gradients across the WAN.

It owns the gRPC server (plaintext on loopback, or mutual TLS with the run's own CA), membership
with leases and epochs, the round engine and outer optimizer (weighted mean, or norm clipping and a
trimmed mean against faulty islands), validation of every push, the divergence guard, versioned
global checkpoints, the state store, the Prometheus metrics and a load benchmark.
"""
