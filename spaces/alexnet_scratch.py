"""Recipe: AlexNet trained from scratch at 32 px (see spaces/scratch.py)."""
from spaces.scratch import scratch_space

SPACE = scratch_space("alexnet_scratch", "alexnet", "AlexNet")
