"""Course commands that are more than a call into the library: the editions of the notebooks, grading."""
