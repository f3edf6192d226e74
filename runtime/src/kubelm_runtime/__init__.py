"""kubelm_runtime."""
