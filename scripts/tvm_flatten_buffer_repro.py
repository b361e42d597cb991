"""Stock TVM only: ``FlattenBuffer`` computes ``x[(j // 4 + i + 1) % 2]`` over ``j < 10`` as
``x[(j // 4 + i) % 2]``. Its iterator-map simplification drops the ``+ 1`` when the range of
``j`` is not a multiple of 4. Seen with apache-tvm 0.25.0, 0.26.0 and 0.27.0. Our schedules
decline such kernels (``surgery/schedules/flattening.py``, docs/tvm-versions.md).

    python scripts/tvm_flatten_buffer_repro.py       # exit 1 when this TVM gets it wrong
"""

import sys

import numpy as np
import tvm
from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def main(x: T.Buffer((T.int64(2),), "float32"), out: T.Buffer((T.int64(2), T.int64(10)), "float32")):
    for i, j in T.grid(T.int64(2), T.int64(10)):
        with T.sblock("out"):
            vi, vj = T.axis.remap("SS", [i, j])
            out[vi, vj] = x[(vj // T.int64(4) + vi + T.int64(1)) % T.int64(2)]


x = np.array([10.0, 20.0], "float32")
out = tvm.runtime.tensor(np.zeros((2, 10), "float32"))
tvm.tirx.build(tvm.IRModule({"main": main}), target="llvm")["main"](tvm.runtime.tensor(x), out)
i, j = np.meshgrid(np.arange(2), np.arange(10), indexing="ij")
wrong = int((out.numpy() != x[(j // 4 + i + 1) % 2]).sum())
print(f"apache-tvm {tvm.__version__}: {wrong} of 20 elements wrong")
sys.exit(1 if wrong else 0)
