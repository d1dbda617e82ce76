"""The Celery app: ``celery -A proj worker`` finds it here."""

import os

from celery import Celery

# Before the app exists: Celery's Django fixup looks for this variable.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
# Every CELERY_* setting in proj/settings.py configures the app.
app.config_from_object("django.conf:settings", namespace="CELERY")
# Find orders/tasks.py (and the tasks.py of every other installed app).
app.autodiscover_tasks()
