"""Peer servers for benchmarks/serving.py: the native model behind MLflow, BentoML and FastAPI."""
