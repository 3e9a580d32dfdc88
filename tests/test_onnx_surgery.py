"""The ONNX fold's surgery in memory: the float64 temporaries of a large model's fold go back to the system as it
goes, so the fold holds little more than the model and its new constants (the fold's peak memory target)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Builds a chain of Conv+BN with 9.4 MB weights in memory, folds it, and prints how much the process grew during
# the surgery as a multiple of the model's size.
SURGERY_GROWTH = """
import os, sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from bntool.onnx_fold import apply_onnx_fold_plan, plan_onnx_fold

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

rng = np.random.default_rng(0)
c, nodes, inits, x = 512, [], [], 'x'
for i in range(8):
    inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (c, c, 3, 3)).astype(np.float32), f'w{i}'))
    for k, v in {'s': rng.uniform(0.5, 1.5, c), 'b': rng.normal(0, 0.1, c), 'm': rng.normal(0, 0.1, c),
                 'v': rng.uniform(0.5, 2, c)}.items():
        inits.append(numpy_helper.from_array(v.astype(np.float32), f'{k}{i}'))
    nodes.append(helper.make_node('Conv', [x, f'w{i}'], [f'c{i}'], pads=[1, 1, 1, 1], name=f'conv{i}'))
    nodes.append(helper.make_node('BatchNormalization', [f'c{i}', f's{i}', f'b{i}', f'm{i}', f'v{i}'], [f'y{i}'],
                                  name=f'bn{i}'))
    x = f'y{i}'
graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, c, 4, 4])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 4, 4])], inits)
data = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]).SerializeToString()
del graph, inits
model = onnx.ModelProto.FromString(data)
size = len(data)
del data
plan = plan_onnx_fold(model)
import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)
before = rss()
changes = apply_onnx_fold_plan(model, plan)
assert len(changes.replaced) == 8 and not any(n.op_type == 'BatchNormalization' for n in model.graph.node)
print((rss() - before) / size)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc's heap")
def test_fold_surgery_grows_by_the_new_constants_not_by_its_temporaries():
    """The new weights are one model's size; without giving the temporaries back, glibc kept about another one
    (ResNet-50's fold peaked at 3.1× its file, over the 3× target)."""
    out = subprocess.run([sys.executable, "-c", SURGERY_GROWTH], capture_output=True, text=True, check=True)
    growth = float(out.stdout.split()[-1])
    assert 0.9 < growth < 1.5, growth  # the new constants (1×), a little slack for the last unreturned 16 MB
