"""Benchmarks: relayd against websockify and HAProxy on the same echo backend (`bench/run.py`)."""
