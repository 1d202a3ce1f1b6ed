"""Autoscaling: scaling groups that start and stop model servers from measured load (issue 16)."""
