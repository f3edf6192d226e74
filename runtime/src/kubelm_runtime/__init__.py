"""kubelm runtime: what runs inside the kubelm runtime image (training, serving, gateway)."""
