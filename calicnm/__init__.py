"""calicnm: Calico-style routed container networking for Docker (CNM)."""

__version__ = "0.1.0"
