"""Launch configurations of the fused convolution (kernels/conv2d_fused.py), kept apart from
the kernel body.

The launcher benchmarks the `candidate_configs` of a shape class once per device (on CUDA only)
and caches the fastest; under the Triton interpreter it uses `interpreter_config` and never
tunes, because every interpreted launch costs seconds.
"""

import triton

# Under the interpreter every tile operation costs Python overhead whatever its size, so the
# fewest, largest tiles that the problem fills run fastest. Tests shrink these to exercise
# several tiles and their tails.
INTERPRETER_MAX_TILE = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}


def interpreter_config(m: int, k: int, c_out: int) -> dict:
    """The one configuration used under the Triton interpreter (never tuned).

    Args:
        m: output pixels N*OH*OW. k: the K extent one tile walks (C_in for the tap-major order,
            KH*KW*C_in for the flat one). c_out: output channels.
    """
    return {
        "BLOCK_M": min(INTERPRETER_MAX_TILE["BLOCK_M"], max(16, triton.next_power_of_2(m))),
        "BLOCK_N": min(INTERPRETER_MAX_TILE["BLOCK_N"], max(16, triton.next_power_of_2(c_out))),
        "BLOCK_K": min(INTERPRETER_MAX_TILE["BLOCK_K"], max(16, triton.next_power_of_2(k))),
        "GROUP_M": 8,
        "num_warps": 4,
        "num_stages": 1,
    }


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for 2-byte operands on Hopper / Ampere;
# fp32 operands use half the BLOCK_K (shared memory per stage stays the same). Few on purpose:
# every candidate is one more compilation per fusion variant on a fresh machine. The first is
# the default when tuning is off.
_CUDA_TILES = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
)

# Below this many input channels the flat K order wastes fewer MMA columns than tap-major.
FLAT_K_MAX_C_IN = 16


def shared_memory_bound(
    block_m: int, block_n: int, block_k: int, stages: int, pool: int, elt_bytes: int
) -> int:
    """An upper bound of the shared memory (bytes) of a tile: num_stages copies of the A tile
    (pool^2 input pixels per output pixel) and of the B tile, and 2 KiB for the epilogue.

    Measured with scripts/compile_report.py (bench/results/README.md): exact for a pipelined
    POOL=1 tile but for the 1 KiB the statistics epilogue adds; above every other (a POOL=2
    128x128x64 3-stage bf16 tile bounds 245,760, takes 196,608 on sm_90 and 180,224 on sm_80).
    """
    return stages * (block_m * block_k * pool * pool + block_k * block_n) * elt_bytes + 2048


def shape_class(m: int, c_in: int, c_out: int, kh: int, kw: int, stride: int, pool: int) -> tuple:
    """The key under which a tuned configuration is cached.

    M is bucketed to a power of two so that batch sizes and image sizes close to each other
    share one tuning run.
    """
    return (triton.next_power_of_2(max(m, 1)), c_in, c_out, kh, kw, stride, pool)


def candidate_configs(
    m: int,
    k: int,
    c_in: int,
    c_out: int,
    flat_k: bool,
    elt_bytes: int,
    pool: int,
    shared_memory_limit: int,
):
    """Configurations worth timing for one shape: tiles no larger than the problem needs, with
    no more pipeline stages than fit the GPU's shared memory (`shared_memory_bound`), so that
    the first one, used without tuning, always launches.

    Args:
        m: output pixels N*OH*OW. k: GEMM depth KH*KW*C_in. c_in, c_out: channels.
        flat_k: the flat K order is used. elt_bytes: operand size (2 for fp16/bf16, 4 for fp32).
        pool: the input average pool's window (2 for a fused avg_down shortcut).
        shared_memory_limit: bytes of shared memory one block may use on the GPU
            (fastres.ops.tuning.shared_memory_limit).
    Returns:
        A list of dicts with BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.
    """
    max_m = max(32, triton.next_power_of_2(m))
    max_n = max(32, triton.next_power_of_2(c_out))
    max_k = max(16, triton.next_power_of_2(k if flat_k else c_in))
    configs, seen = [], set()
    for block_m, block_n, block_k, warps, stages in _CUDA_TILES:
        block_k = max(16, block_k * 2 // elt_bytes)
        block_m, block_n, block_k = min(block_m, max_m), min(block_n, max_n), min(block_k, max_k)
        while (
            stages > 1
            and shared_memory_bound(block_m, block_n, block_k, stages, pool, elt_bytes)
            > shared_memory_limit
        ):
            stages -= 1
        tile = (block_m, block_n, block_k, warps, stages)
        if tile in seen:
            continue
        seen.add(tile)
        configs.append(
            {
                "BLOCK_M": tile[0],
                "BLOCK_N": tile[1],
                "BLOCK_K": tile[2],
                "GROUP_M": 8,
                "num_warps": warps,
                "num_stages": stages,
            }
        )
    return configs
