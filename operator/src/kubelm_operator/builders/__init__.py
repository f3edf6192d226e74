"""Pure functions from typed specs to the Kubernetes objects the operator owns (plain dicts)."""
