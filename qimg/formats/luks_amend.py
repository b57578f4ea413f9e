"""qemu-img amend of a luks image: its options (block/crypto.c's
QCryptoBlockAmendOptionsLUKS) checked as qemu-img checks them, then the
key slots changed (qimg.formats.luks.LuksImage.amend_keyslots)."""

from __future__ import annotations

from collections.abc import Mapping

from qimg.crypto import luks1
from qimg.formats.luks import LuksImage

# block/crypto.c's amend options (QCryptoBlockAmendOptionsLUKS), for -o help.
AMEND_HELP = (
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
    ("old-secret", "str", "Select all keyslots that match this password"),
    ("state", "str", "Select new state of affected keyslots (active/inactive)"),
)


def amend_options_help() -> str:
    """`qemu-img amend -f luks -o help`."""
    from qimg.create import OptDesc, help_lines

    opts = [OptDesc(name, typ, None, text) for name, typ, text in AMEND_HELP]
    return "\n".join(["Amend options for 'luks':", *help_lines(opts)])


def amend_luks(image: LuksImage, text: str, secrets: Mapping[str, bytes], force: bool) -> None:
    """qemu-img amend of a luks image with the -o string `text`: the names
    checked as qemu_opts_do_parse checks them (a creation option gets
    qemu-img's hint), the last of a repeated name taken."""
    from qimg.create import FORMAT_OPTS
    from qimg.errors import BadOptionError
    from qimg.options import split_options

    amendable = {name for name, _t, _h in AMEND_HELP}
    creatable = {o.name for o in FORMAT_OPTS["luks"]}
    pairs = split_options(text)
    opts: dict[str, str] = {}
    for key, value in pairs:
        if key not in amendable:
            message = f"Invalid parameter '{key}'"
            if all(k in amendable or k in creatable for k, _v in pairs):
                message += "\nThis option is only supported for image creation"
            raise BadOptionError(message)
        opts[key] = "on" if value is None else value
    image.amend_keyslots(luks1.parse_amend_options(opts, ""), secrets, force)
