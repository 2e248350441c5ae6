"""The tiny end-to-end pipeline on CPU (``python -m tulu3.demo``) and its data."""
