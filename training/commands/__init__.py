"""The `remi-train` command groups; training/cli.py assembles them into one app."""
