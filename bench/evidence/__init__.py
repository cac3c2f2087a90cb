"""The evidence model: a small SD1.x-layout checkpoint trained here on scikit-learn's handwritten
digits, the metrics that read its images, and the tables that measure every capability on it.
Run through ``scripts/evidence build`` / ``scripts/evidence report``."""
