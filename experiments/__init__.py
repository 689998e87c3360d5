"""Experiment drivers that run against live servers (issue 5): see serving_cpu.py."""
