"""The `jaxbnb` command line, the demo and the benchmarks.

The top of the dependency graph: may import every other subpackage and the
public modules. torch, bitsandbytes and matplotlib (benchmark comparisons and
plots) are imported inside the functions that need them.
"""
