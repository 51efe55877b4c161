"""The rolling-restart benchmark's parts (bench/rolling_restart.py is the entry point)."""
