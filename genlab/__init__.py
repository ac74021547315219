"""``python -m genlab <command>`` (and ``torchrun ... -m genlab train ...``): the ``genlab`` command.

The code lives in ``lab_utils`` (harness, data, metrics, CLI) and ``labs`` (the model families).
"""
