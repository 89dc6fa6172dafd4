"""Communicators: the only way replicas talk (base: the interface and Solo; threads, stacked,
and torch_dist, the only module of unison that imports torch.distributed)."""
