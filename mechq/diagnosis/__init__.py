"""Layer 6 — diagnosis: the verdict on a variant, with the evidence behind it (§4.3)."""
