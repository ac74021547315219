"""The top layer: what users run. ``cli`` is the ``genlab`` command and dispatches to a module per command
(compare, bench, pretrained, notebooks, grading, serve, evaluation, sample, data). Nothing below imports from
here (see ``lab_utils/__init__.py``). This file imports nothing."""
