"""`python -m kubelm_operator` runs the operator, like `kubelm-operator`."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
