"""Disk encryption as QEMU's crypto/ layer does it, over `cryptography`.

- `sectors`: sector ciphers (AES and CAST5 in XTS, CBC, ECB, CTR with the
  plain, plain64 and essiv IV generators; the legacy qcow AES-CBC cipher),
  whole runs of 512-byte sectors per call, never a cipher object per sector.
- `luks1`: the LUKS1 header and key slots (PBKDF2, the anti-forensic
  splitter, the master key digest): create, unlock, inspect, amend.

`cryptography` and numpy are imported when a cipher is made, not before.
"""
