"""The pool's mappings in thin_dump's XML, for thin_restore to make kernel dm-thin metadata.

The format thin-provisioning-tools read and write: a `superblock` with the
data block size in 512-byte sectors, one `device` per thin device, and runs
of mappings as `range_mapping` (consecutive virtual blocks on consecutive
pool blocks) or `single_mapping`. thin_restore turns it into the metadata a
kernel thin-pool target opens over the same data device, so a userspace
pool's devices can move to a kernel pool block for block.
"""

from __future__ import annotations

from collections.abc import Iterator

from minifs_drivers.thin_pool import UNMAPPED, Device, ThinPool


def dump_xml(pool: ThinPool) -> str:
    lines = [
        f'<superblock uuid="" time="{pool.time}" transaction="{pool.transaction}" flags="0" '
        f'version="2" data_block_size="{pool.block // 512}" nr_data_blocks="{pool.nr_blocks}">'
    ]
    for device in sorted(pool.devices.values(), key=lambda d: d.thin_id):
        mapped = len(device.mapping) - device.mapping.count(UNMAPPED)
        lines.append(
            f'  <device dev_id="{device.thin_id}" mapped_blocks="{mapped}" '
            f'transaction="{pool.transaction}" creation_time="{device.creation_time}" '
            f'snap_time="{device.snap_time}">'
        )
        for origin, data, length in _runs(device):
            if length == 1:
                lines.append(
                    f'    <single_mapping origin_block="{origin}" data_block="{data}" time="0"/>'
                )
            else:
                lines.append(
                    f'    <range_mapping origin_begin="{origin}" data_begin="{data}" '
                    f'length="{length}" time="0"/>'
                )
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


def _runs(device: Device) -> Iterator[tuple[int, int, int]]:
    """(first virtual block, first pool block, length) of each run."""
    start = data = length = 0
    for vblock, pblock in enumerate(device.mapping):
        if length and pblock == data + length and vblock == start + length:
            length += 1
            continue
        if length:
            yield start, data, length
            length = 0
        if pblock != UNMAPPED:
            start, data, length = vblock, pblock, 1
    if length:
        yield start, data, length
