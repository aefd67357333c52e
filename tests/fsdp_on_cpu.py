"""``n2ce-distill`` under Accelerate's FSDP2 state on CPU processes (gloo), for the tests.

Accelerate sets FSDP up only on accelerators: on CPUs its state says MULTI_CPU and the plugin goes unused,
although torch's FSDP2 runs on gloo. This launcher records the state Accelerate records on a GPU machine
(``distributed_type`` FSDP in both of its state singletons, with the plugin it built from the environment) and
runs the CLI; every other line of the FSDP path (sharding, optimiser swap, clipping, save and load) is
Accelerate's and torch's own. Run as ``torchrun ... tests/fsdp_on_cpu.py train RECIPE ...`` with
``ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_STATE_DICT_TYPE=FULL_STATE_DICT``.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from n2ce_distill.cli import main

    sys.exit(main(sys.argv[1:]))
