"""Signals that mark the boundaries of units of work.

Any runner fires them itself; the app's receivers apply ``TASK_DB``.

- ``task_started(sender, strategy=None)``: a unit of work begins in this
  thread. ``strategy`` overrides ``TASK_DB`` for this unit.
- ``task_finished(sender, failed=False, strategy=None)``: it ended;
  ``failed`` is true when it raised.
- ``worker_process_started(sender)``: a new worker process, usually forked,
  is about to run its first unit: connections inherited from the parent
  are discarded without network IO.
- ``worker_stopping(sender)``: the worker is about to exit: every
  connection of this thread is closed, and Django's connection pools too.

Sent by the app:

- ``connection_closed(sender, alias, reason)``: a connection was closed
  (``sender`` is the backend's ``DatabaseWrapper`` class). ``reason`` is
  the strategy's name, ``"failure"``, ``"worker_stopping"`` or
  ``"inherited"``.
"""

from __future__ import annotations

from django.dispatch import Signal

task_started = Signal()
task_finished = Signal()
worker_process_started = Signal()
worker_stopping = Signal()
connection_closed = Signal()
