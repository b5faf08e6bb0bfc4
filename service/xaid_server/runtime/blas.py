"""numpy's BLAS runs on the calling thread only: onnxruntime's pools own the cores.

Every process that creates xaid's sessions (`SessionFactory`: the server, an audit replay, the
tools and benchmarks) sets this once. A replay must also sum as the server did.

OpenBLAS starts a thread per core for a large enough product (an integrated-gradients sum, a
surrogate's least squares) and those threads spin for a while after it. On a small machine they
then take the cores from the next session run: on two cores, integrated gradients on the
benchmarks' small ResNet took 124 ms through gRPC with them and 95 ms without.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def single_threaded_blas() -> None:
    """Limit every BLAS library loaded in the process to one thread, for good."""
    threadpool_limits(limits=1, user_api="blas")
