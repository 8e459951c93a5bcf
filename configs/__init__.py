"""Run configs: ``configs/schema.py`` is the typed schema; every YAML in this folder mirrors it."""
