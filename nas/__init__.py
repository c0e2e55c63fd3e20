"""Second-order neural architecture search built on the curvature utilities of `defbound`."""
