"""The coordinator: the Flower ServerApp, federated planning, aggregation, checkpoints, reports."""
