"""Recipe: VGG-13-BN trained from scratch at 32 px (see spaces/scratch.py)."""
from spaces.scratch import scratch_space

SPACE = scratch_space("vgg13_scratch", "vgg13_bn", "VGG-13-BN")
