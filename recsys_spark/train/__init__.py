"""Distributed training of the deep models: Petastorm loaders, launchers (Horovod, torch DDP, local),
the training loop and checkpoints. Modules are imported explicitly; this package imports nothing."""
