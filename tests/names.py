"""The Redis names the suite uses on the shared server, from the environment.

The database names live in tests/settings.py; README.rst's Development
section lists every variable.
"""

import os

# Redis: the server, and the suite's six databases from TASK_DB_REDIS_FIRST_DB
# on, one per group of tests, so that what one group leaves queued never
# reaches another's workers. A second run beside this one needs its own.
REDIS_URL = os.environ.get("TASK_DB_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_FIRST_DB = int(os.environ.get("TASK_DB_REDIS_FIRST_DB", "10"))
REDIS_DB_BAD_INPUT = REDIS_FIRST_DB  # tests/test_bad_input.py
REDIS_DB_IN_PROCESS = REDIS_FIRST_DB + 1  # tests/celery_app.py's own worker
REDIS_DB_WORKERS = REDIS_FIRST_DB + 2  # worker processes of tests/workers.py
REDIS_DB_EXAMPLE = REDIS_FIRST_DB + 3  # examples/celeryproject
REDIS_DB_CELERY = REDIS_FIRST_DB + 4  # tests/test_celery.py
REDIS_DB_BENCHMARK = REDIS_FIRST_DB + 5  # python -m tests.benchmarks
