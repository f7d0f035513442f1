"""Recipe: ResNet-18 trained from scratch at 32 px (see spaces/scratch.py)."""
from spaces.scratch import scratch_space

SPACE = scratch_space("resnet18_scratch", "resnet18", "ResNet-18")
