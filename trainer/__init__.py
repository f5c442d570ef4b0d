"""ekd student side: students, distillation methods, data, the training loop and the CLI.

The core modules are plain PyTorch; Ray appears only in `trainer.ray_train` and the CLI that starts it.
"""
