"""What runs on each worker: build the parts, train, validate, and the elastic machinery
(idle ranks, growth, restart history, fault injection). Knows nothing of Ray: a ``Runtime``
(``runtime``) is all it asks of the launcher."""
