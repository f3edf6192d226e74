"""Serving: queue-fed inference workers (`kubelm-runtime serve`) and the HTTP gateway."""
