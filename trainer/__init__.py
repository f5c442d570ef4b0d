"""ekd student side, one package per concept: data, students, methods, runs (one experiment, the loop, the
teacher sources, the Ray Train adapter), bank (`ekd warm`, the audit), results (report, baselines) and cli.

The core is plain PyTorch; Ray appears only in `trainer.runs.ray_train`, `trainer.bank.warm` and the CLI that
starts them.
"""
