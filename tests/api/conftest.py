from __future__ import annotations

GROUP, VERSION = "kubelm.io", "v1alpha1"
