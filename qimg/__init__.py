"""qimg: a qemu-img work-alike for qcow2 and raw disk images."""

__version__ = "0.1.0"
