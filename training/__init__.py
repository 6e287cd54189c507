"""Offline training, evaluation, export and the nightly job (`remi-train`)."""

from remi_core.threads import prepare_environment

# Before any training module imports torch: OpenMP reads its settings once, when it loads.
prepare_environment("spin")
