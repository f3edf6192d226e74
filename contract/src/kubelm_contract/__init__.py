"""What the kubelm operator and runtime must agree on.

Names, keys, configuration variables and the wire protocol live here once; both
sides import them. This package has no third-party dependencies on purpose.
"""
