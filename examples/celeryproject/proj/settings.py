"""Settings of the example project.

SQLite by default; MariaDB/MySQL or PostgreSQL through the environment:

    DATABASE_ENGINE   sqlite (default), mysql or postgresql
    DATABASE_NAME     SQLite: the file (default db.sqlite3 here);
                      servers: the database (default celeryproject)
    DATABASE_HOST     127.0.0.1
    DATABASE_PORT     3306 (mysql) or 5432 (postgresql)
    DATABASE_USER     root (mysql) or postgres (postgresql)
    DATABASE_PASSWORD empty
    CONN_MAX_AGE      60 (seconds a connection may be reused; 0: one per task)

and Celery's: CELERY_BROKER_URL, CELERY_RESULT_BACKEND (both
redis://127.0.0.1:6379/0), CELERY_TASK_DEFAULT_QUEUE (celery). TASK_DB_STRATEGY
sets TASK_DB["STRATEGY"] (close_old).
"""

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("SECRET_KEY", "only-for-the-example")
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"  # log times in UTC, like the servers' logs
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django_task_db",
    "orders",
]

# Databases ----------------------------------------------------------------

ENGINE = os.environ.get("DATABASE_ENGINE", "sqlite")
SERVER_DEFAULTS = {  # engine: (Django backend, port, user)
    "mysql": ("django.db.backends.mysql", "3306", "root"),
    "postgresql": ("django.db.backends.postgresql", "5432", "postgres"),
}

default: dict[str, Any]
if ENGINE == "sqlite":
    default = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DATABASE_NAME", str(BASE_DIR / "db.sqlite3")),
    }
elif ENGINE in SERVER_DEFAULTS:
    backend, port, user = SERVER_DEFAULTS[ENGINE]
    default = {
        "ENGINE": backend,
        "NAME": os.environ.get("DATABASE_NAME", "celeryproject"),
        "HOST": os.environ.get("DATABASE_HOST", "127.0.0.1"),
        "PORT": os.environ.get("DATABASE_PORT", port),
        "USER": os.environ.get("DATABASE_USER", user),
        "PASSWORD": os.environ.get("DATABASE_PASSWORD", ""),
    }
    if ENGINE == "postgresql":
        # What `manage.py check --database default` recommends (W004, W005):
        # the server ends the query of a killed worker, and the transaction of
        # a stalled one.
        default["OPTIONS"] = {
            "options": "-c client_connection_check_interval=10s "
            "-c idle_in_transaction_session_timeout=5min"
        }
else:
    raise ValueError(f"DATABASE_ENGINE is {ENGINE!r}; use sqlite, mysql or postgresql.")
# Keep a connection open between tasks for up to this many seconds.
default["CONN_MAX_AGE"] = int(os.environ.get("CONN_MAX_AGE", "60"))
DATABASES = {"default": default}

# django-task-db -----------------------------------------------------------

TASK_DB = {
    # What happens to each open connection at the start and end of every task:
    # "close_old" is what Django does around a request (close it if it is
    # older than CONN_MAX_AGE or broken), "close_all" closes it every time,
    # "keep" does nothing. A task can choose its own: see orders/tasks.py.
    "STRATEGY": os.environ.get("TASK_DB_STRATEGY", "close_old"),
    # A strategy per database alias, for instance for a read replica:
    # "ALIASES": {"replica": "keep"},
    # Ping a connection once before a task's first query, replace it if dead.
    "HEALTH_CHECKS": True,
    # Close the connections of a task that failed, whatever the strategy.
    "CLOSE_ON_FAILURE": True,
    # Also close Django's cache connections after every task.
    "CLOSE_CACHES": False,
    # Prefork children drop the parent's connections without touching them.
    "FORK_SAFETY": True,
    # Drive all of the above from Celery's signals, instead of the database
    # handlers of Celery's Django fixup (which close every connection).
    "CELERY": True,
    "REPLACE_CELERY_FIXUP": True,
}

# Celery (read by proj/celery.py: CELERY_FOO is Celery's foo) --------------

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get(
    "CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"
)
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_RESULT_EXPIRES = 3600
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Logging: the connections opening and closing (orders), and django-task-db --

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "worker": {
            "format": "[%(asctime)s: %(levelname)s/%(processName)s] "
            "%(name)s: %(message)s"
        }
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "worker"},
    },
    "loggers": {
        # propagate False: Celery's worker logs the root logger's records too.
        "django_task_db": {
            "handlers": ["console"],
            "level": "DEBUG",
            "propagate": False,
        },
        "orders": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
