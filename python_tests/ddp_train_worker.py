"""Run by test_distributed.py, alone or under torchrun: trains a tiny OPQN model on ORL in float64
(where floating-point reduction order no longer shows) with the given extra options."""
import sys

import torch

import opqn_ext.train as train_module

torch.set_default_dtype(torch.float64)  # the model's weights; it maps the uint8 images to their dtype
sys.exit(train_module.main(sys.argv[1:]))
