"""Tandem: a distributed, multi-site contact-center routing cluster."""

__version__ = "0.1.0"
