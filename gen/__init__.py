"""qinfer's kernel generator: runs at build time only.

machine.py   reads the build machine (cache sizes, SIMD flags)
perfmodel.py picks the Micro-GEMV tile (mu x tu) and Mini-GEMV block (mb x tb)
bitlayout.py describes, per bitwidth, where each packed value sits in its words
render.py    renders pyx/qgemm.pyx.tp once per bitwidth into the build tree
"""
