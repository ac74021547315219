"""Exercise checks: compare a student's function (or layer) with the reference on fixed inputs.

A notebook exercise is a code cell in which the student writes a function, followed by a
cell that checks it::

    def attention(q, k, v, mask=None):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    check_attention(attention)   # -> "✅ attention: passed (5 cases)" or "❌ attention: ..."

The checks run the student's code and the reference on the same :class:`~.cases.Case` inputs (each
on its own copy, so a function that works in place cannot corrupt the reference), with the
same random seed (so functions that sample noise can be checked too), compare the results
recursively and print **one line**: a pass, or what differed (which case, which field, the
shapes, the largest error) and a hint. A stub that still raises ``NotImplementedError``
gets "not implemented yet". The check returns a :class:`~.checks.CheckResult`, true when it passed.

One module per job, each importing only those above it in this list:

    difference.py  ``difference(got, expected)``: where an output first differs from the expected one (or None)
    forbidden.py   ``forbidden(targets)``: the code-object surgery that makes the reference raise while the
                   student's code runs, and the message that names it when it did
    cases.py       what a check runs: its inputs (``Case``), its hints (``Hint``), one call on copies of a case's
                   inputs under a seed, the known-mistake match (shared by the notebook's check and the grader's judge)
    records.py     the graded halves: ``graded``, ``case_seed``, ``check_spec`` and ``observe`` (the sandbox's
                   half) and ``judge`` (the grader's), with ``CheckSpec`` and ``Observation``
    checks.py      the checks a topic calls: ``check_function``, ``check_module``, ``check_value``

The switches a notebook reads (``smoke_mode``, ``pretrained_mode``, ``strict_mode``) are not exercise machinery:
they live in :mod:`lab_utils.core.switches`.

This package knows no lab. The topic-specific checks (``check_attention`` ...) live next to what they
check, as content of that lab: ``labs/<family>/exercises.py`` (``labs.text_encoder.exercises``,
``labs.gan.exercises`` ...) and ``labs/evaluator/exercises.py`` for the metrics; they are thin
wrappers that fix the cases and hints. This file imports nothing: import each name from its module.
"""
