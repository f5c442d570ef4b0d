"""One experiment's run: its config, the training loop, prefetching, teacher sources, the backends (in
process, Ray Train) and progress."""
