"""Weight formats for linear layers, each a `LinearMethod` (see base.py)."""
