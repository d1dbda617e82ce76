"""Benchmarks of django-task-db: ``python -m tests.benchmarks --help``.

Run from the repository's root, with the servers of the test suite up
(tests/settings.py; a server that does not answer is skipped):

1. overhead: what one task boundary costs, against a bare signal send and
   Celery's own Django fixup;
2. celery: tasks/s and server connections through a real Celery worker
   (solo in-process, prefork -c 2 subprocess), per strategy, against Celery's
   fixup alone and no connection management at all;
3. direct: task_scope without a broker, in a loop and in 8 threads;
4. memory: growth over 100,000 boundaries.

The figures are printed as tables and written as JSON. Comparisons are
ratios taken within one repetition, the variants interleaved; nothing here
asserts anything about speed.
"""
