"""qimg: a qemu-img work-alike for qcow2 and raw disk images.

    import qimg
    with qimg.open_image("disk.qcow2", writable=True) as img:
        img.write(0, b"hello")

`open_image` and `create_image` are loaded on first use (module
__getattr__), so `import qimg` stays cheap for the command line.
"""

__version__ = "0.1.0"
__all__ = ["open_image", "create_image", "__version__"]


def __getattr__(name: str):
    if name in ("open_image", "create_image"):
        from qimg import api

        return getattr(api, name)
    raise AttributeError(f"module 'qimg' has no attribute {name!r}")
