"""OCI layer tars: apply them to snapshots and diff snapshots into them.

`apply.apply_layer` / `diff.write_diff` work on directories; `snapshots.apply_to`
/ `snapshots.diff_of` on named snapshots of any driver. Layers are hostile
input: see `apply` for what is refused and how nothing outside the root is
ever reached.
"""
