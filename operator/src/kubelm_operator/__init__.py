"""kubelm_operator."""
