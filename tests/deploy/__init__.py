"""Deployment tests: the real scripts/deploy-load-balancer.sh on this host (pytest -m deploy)."""
