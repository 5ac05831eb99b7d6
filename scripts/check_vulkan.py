"""Exit 0 if SAPIEN can create a Vulkan render device, else print why and exit 1.

scripts/setup.sh runs this in its own process: a broken Vulkan driver can crash
the interpreter, so the probe must not share a process with anything that matters.
"""

import sys
import warnings

warnings.filterwarnings("ignore")  # SAPIEN warns when it falls back to its own libvulkan

try:
    import sapien

    system = sapien.render.RenderSystem()  # the default Vulkan device, as ManiSkill picks it
    print(f"vulkan-ok: {system.device.name}")
except Exception as e:  # noqa: BLE001 - any failure means "no usable device"
    print(f"vulkan-missing: {type(e).__name__}: {e}".splitlines()[0])
    sys.exit(1)
