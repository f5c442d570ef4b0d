"""The `ekd` command line (`trainer.cli.main:app`) and `ekd demo`."""
