"""Settings for the test suite: SQLite, MariaDB and PostgreSQL side by side.

The servers' addresses come from the environment, with the defaults of the
development and CI machines.
"""

import json
import os
from pathlib import Path

import django

SECRET_KEY = "django-task-db-tests"
USE_TZ = True
INSTALLED_APPS = ["django_task_db", "tests.testapp"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

MYSQL_DATABASE = os.environ.get("TASK_DB_MYSQL_NAME", "django_task_db_tests")
POSTGRES_APPLICATION_NAME = os.environ.get(
    "TASK_DB_POSTGRES_APPLICATION_NAME", "django_task_db_tests"
)

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get(
            "TASK_DB_SQLITE_PATH", str(Path(__file__).parent / "db.sqlite3")
        ),
        "CONN_MAX_AGE": None,
    },
    "mysql": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": MYSQL_DATABASE,
        "HOST": os.environ.get("TASK_DB_MYSQL_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TASK_DB_MYSQL_PORT", "3306"),
        "USER": os.environ.get("TASK_DB_MYSQL_USER", "root"),
        "PASSWORD": os.environ.get("TASK_DB_MYSQL_PASSWORD", ""),
        "CONN_MAX_AGE": None,
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("TASK_DB_POSTGRES_NAME", "test"),
        "HOST": os.environ.get("TASK_DB_POSTGRES_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TASK_DB_POSTGRES_PORT", "5432"),
        "USER": os.environ.get("TASK_DB_POSTGRES_USER", "postgres"),
        "PASSWORD": os.environ.get("TASK_DB_POSTGRES_PASSWORD", ""),
        "CONN_MAX_AGE": None,
        "OPTIONS": {"application_name": POSTGRES_APPLICATION_NAME},
    },
}

if django.VERSION >= (5, 1):
    # Django's own connection pool (psycopg_pool) needs CONN_MAX_AGE = 0.
    DATABASES["pgpool"] = {
        **DATABASES["postgres"],
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "application_name": POSTGRES_APPLICATION_NAME + "_pool",
            "pool": {"min_size": 2, "max_size": 4, "timeout": 10},
        },
    }

# An alias through a PgBouncer that a test or the benchmark started
# (tests/pgbouncer.py), for the worker subprocesses they start.
if "TASK_DB_BOUNCER_DATABASE" in os.environ:
    DATABASES["bouncer"] = json.loads(os.environ["TASK_DB_BOUNCER_DATABASE"])

# Worker subprocesses started by the tests get their TASK_DB from here.
if "TASK_DB_TEST_SETTINGS" in os.environ:
    TASK_DB = json.loads(os.environ["TASK_DB_TEST_SETTINGS"])
