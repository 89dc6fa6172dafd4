"""The worker side: everything that runs inside a worker, and nothing of the driver.

``job`` is what crosses the process boundary, ``view`` the replica protocol that strategies,
the guard, the round records and the checkpointer see, ``replica``/``stacked`` its two
implementations, and ``loop.run`` the one training loop for every backend and 1..N workers.
"""
