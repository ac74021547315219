"""The harness: trains, checkpoints and loads any Lab and knows no family; it imports the core only (see
``lab_utils/__init__.py``). ``run.train`` is one run from config to checkpoint, ``trainer.Trainer`` the loop,
``zoo`` the shipped models. This file imports nothing."""
