"""Nightly retraining and bootstrap: the steps are listed in job.py's docstring.

Modules: config.py (NightlyConfig), lock.py (the Redis lock), event_log.py (the event stream
and the saved events), job.py (the steps, in order), publish.py (compare and publish).
"""

from training.nightly.config import NightlyConfig, NightlyError
from training.nightly.job import run_bootstrap, run_nightly
from training.nightly.lock import LockHeld, LockLost

__all__ = ["LockHeld", "LockLost", "NightlyConfig", "NightlyError", "run_bootstrap", "run_nightly"]
