"""coordinator: the service that merges islands' pseudo-gradients across the WAN.

It owns the gRPC server (plaintext on loopback, or mutual TLS with the run's own CA), membership
with leases and epochs, the round engine and outer optimizer (weighted mean, or norm clipping and a
trimmed mean against faulty islands), validation of every push, the divergence guard and rollback,
versioned global checkpoints, the state store (sqlite, or etcd with a standby coordinator), the
Prometheus metrics and a load benchmark.

Fault tolerance, in one place:

- An acknowledged push is durable. Before `PushPseudoGrad` answers, the push's payload is written
  to `state_dir/spill/` (fsynced) and recorded as pending in the state store. A coordinator that
  dies before the round commits finds it there on restart and queues it again; the island's retry
  of the same push is answered ALREADY_EXISTS. (The other option, answering only after the commit,
  would hold every push's stream open for a whole round and still need the commit itself durable.)
- A push is applied at most once: its key (island, round, fragment) is written in the same store
  transaction as the version that applies it, and round numbers never go back, not even on rollback.
- A version is visible only once durable, and never goes back past a commit: a restarted
  coordinator loads the newest checkpoint and replays the versions committed after it from their
  spilled pushes, checking each replayed delta against the one it broadcast.
- Islands whose lease the restarted (or new) leader does not know are told to register again (a
  new epoch); pushes with the old epoch are refused.
- With etcd, a standby wins the leader election when the leader's lease lapses; every state write
  is a transaction conditioned on the writer's leader epoch, so a deposed leader cannot commit.
- The divergence guard refuses non-finite, norm-spiking or loss-spiking rounds; repeated refusals,
  or an operator, roll back to a kept checkpoint on a new timeline, and islands reload.
"""
