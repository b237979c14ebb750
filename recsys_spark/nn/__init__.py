"""The torch networks, one module per model, pure torch: they import nothing of Spark or of this library, so
executors and benchmarks load them alone. A network keeps its constructor arguments in ``init_kwargs``
(JSON), so a saved model is its ``state_dict`` plus those arguments."""
