"""Remote servers as the trainer sees them: a pool of replicas of one service over HTTP (failover, retries,
health probes, the all-dead deadline: `replicas.py`) and the discovery files launchers write (`discovery.py`).
Shared by the teachers' clients and the served rollout engines; it knows no protocol of theirs."""
