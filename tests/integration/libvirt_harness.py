"""The private libvirtd of the tests; it lives in the product as :mod:`cumulo.libvirtd` (the local cloud
runs its hosts with it). Kept as a re-export for the test modules that import it from here."""

from __future__ import annotations

from cumulo.libvirtd import (  # noqa: F401
    CAPABILITIES,
    QEMU_USER,
    SYSTEM_DIRS,
    LibvirtUnavailable,
    PrivateLibvirtd,
    default_cache_dir,
    unavailable_reason,
)
