"""LVM: pretraining Large Vision Models on visual sentences of VQ tokens."""

__version__ = "0.1.0"
