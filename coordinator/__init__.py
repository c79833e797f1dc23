"""coordinator: the service that merges islands' pseudo-gradients across the WAN.

It owns the gRPC server, membership with leases and epochs, the round engine and outer optimizer,
validation of every push, the divergence guard, versioned global checkpoints, the state store and
the Prometheus metrics.
"""
