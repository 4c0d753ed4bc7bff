"""Re-exports only: the units of the offline stage are `lvm.data.offline.units`.

Why this file is still here: `lvm.data.store` and `lvm.data.compose` were written against this path while the
offline package was made; they import these names from here until they import them from there. Then this file
goes. No logic lives here.
"""

from lvm.data.offline.units import InputError, Unit, plan_units, read_lines

__all__ = ["InputError", "Unit", "plan_units", "read_lines"]
