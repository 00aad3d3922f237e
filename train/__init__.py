"""Training entry points (installed as beit_fast.train)."""
