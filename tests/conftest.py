import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # in-process tests use tiny tensors: one thread is fastest, and leaves a core to the subprocesses
