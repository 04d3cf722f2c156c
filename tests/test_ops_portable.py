"""The CPU kernels' portable paths (taken on CPUs without AVX2 + FMA), and their AVX2 paths where
the CPU has AVX-512, against the references.

The machines that run the suite have AVX2, so every other op test exercises the fastest paths; here
child processes with ``DIVFAST_CPU_BASELINE=1`` (portable) and ``DIVFAST_CPU_BASELINE=avx2`` (no
AVX-512: attribution_stats' 3 x 3 AVX2 tiles at M >= 5), read once per process by
csrc/cpu/cpu_features.h, check that they really took those paths and that every kernel still equals
its reference.
"""

import os
import subprocess
import sys
import textwrap

import divfast._ops._load as load

CHILD = textwrap.dedent("""
    import itertools
    import os
    import torch
    import divfast._ops._load as load
    from divfast import _C
    from divfast._ops import reference

    assert load.load_extension(), load.load_error()
    assert _C.cpu_path() == os.environ["WANT_PATH"], _C.cpu_path()
    ops = torch.ops.divfast
    gen = torch.Generator().manual_seed(7)

    def same(got, want, exact=True):
        for g, w in zip(got, want):
            if exact:
                assert torch.equal(g, w), (g, w)
            else:
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)

    for m, b, c in [(3, 37, 5), (5, 130, 11), (2, 0, 3)]:
        z = torch.randn(m, b, c, generator=gen)
        t = torch.randint(0, c, (b,), generator=gen)
        same(ops.pair_counts(z, t), reference.pair_counts(z, t))

    # 14 members and 3 x 40 x 40 maps: several blocks per work item and a partial last block; 3 x 100
    # x 100: work items of 8 blocks (the last of 6), so the SIMD tiles' lanes are flushed midway and
    # at the end; 11 and 16 members: the AVX2 tiles' groups of 3 rows end in 1 and in 3 rows
    for m, shape in [(3, (9, 3, 7, 5)), (14, (4, 3, 16, 16)), (1, (2, 1, 3, 3)), (14, (2, 3, 40, 40)),
                     (6, (3, 1, 131, 67)), (5, (2, 3, 100, 100)), (3, (2, 3, 100, 100)),
                     (11, (2, 1, 37, 29)), (16, (2, 3, 30, 30))]:
        a = torch.randn(m, *shape, generator=gen)
        for normalize in ("none", "l2"):
            want = reference.attribution_stats(a.double(), True, normalize, 0)
            got = ops.attribution_stats(a, True, normalize, 0)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)

    # float16 and bfloat16 maps of whole 256-pixel blocks, which the AVX2 tiles convert themselves
    # (a partial last block goes through the conversion loop: the same bits when its extra pixel is 0)
    for m, dtype in itertools.product((3, 6), (torch.float16, torch.bfloat16)):
        a = torch.randn(m, 2, 512, generator=gen).to(dtype)
        a[..., -1] = 0
        want = reference.attribution_stats(a.double(), True, "l2", 0)
        got = ops.attribution_stats(a, True, "l2", 0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)
        partial = ops.attribution_stats(a[..., :-1].contiguous(), True, "l2", 0)
        same(got, partial)

    x = torch.randn(5, 9, 13, generator=gen, dtype=torch.float64)
    grams = x @ x.transpose(1, 2)
    torch.testing.assert_close(ops.hsic(grams), reference.hsic(grams), rtol=1e-10, atol=1e-10)

    for pool, n, c in [(6, 90, 37), (5, 40, 1000)]:
        z = torch.randn(pool, n, c, generator=gen)
        t = torch.randint(0, c, (n,), generator=gen)
        z[:, torch.arange(n), t] += torch.linspace(0, 4, n)
        near = z.double()  # every member puts class t + 1 2**-40 above the target: float32's band
        rows = torch.arange(n)
        near[:, rows, (t + 1) % c] = near[:, rows, t] + 2.0**-40
        for k in (1, 2, 3, 4):
            subsets = torch.tensor(list(itertools.combinations(range(pool), k)))
            for rule in ("average", "vote", "median", "geometric"):
                for logits in (z, near):
                    same(ops.ensemble_sweep(logits, t, subsets, rule),
                         reference.ensemble_sweep(logits, t, subsets, rule))
    print(os.environ["WANT_PATH"], "ok")
""")


def _run_child(baseline: str, want: str) -> None:
    env = dict(os.environ, DIVFAST_CPU_BASELINE=baseline, WANT_PATH=want)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{want} ok" in done.stdout


def test_portable_cpu_paths_equal_the_references():
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    from divfast import _C

    assert _C.cpu_path() in ("avx512", "avx2", "portable")
    _run_child("1", "portable")


def test_avx2_cpu_paths_equal_the_references():
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    from divfast import _C

    # Capped at AVX2: the AVX2 paths where the CPU has AVX2 (every CPU that runs CI), else portable.
    _run_child("avx2", "portable" if _C.cpu_path() == "portable" else "avx2")
