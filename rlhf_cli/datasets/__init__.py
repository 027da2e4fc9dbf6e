"""Shipped datasets (see README.md here); regenerate with scripts/make_demo_data.py."""
