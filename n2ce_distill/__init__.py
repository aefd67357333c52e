"""n2ce_distill."""
