"""Batched weighted k-means (cqtool.kmeans): recovery, weights, determinism, empty clusters, N < k, faiss parity,
the fp16 distance path and the fused Triton kernel CUDA uses (the kernel also on CPU through Triton's
interpreter), chunking, input errors, a CUDA run; and `cqtool bench kmeans` at a tiny size."""
import json
import math
import os

import pytest
import torch

from cqtool import kmeans
from cqtool.config import ConfigError

from conftest import cuda


def blobs(G=3, k=8, per=100, c=8, spread=20.0, noise=0.5, seed=0):
    """G groups of k well-separated Gaussian blobs -> (x [G, k*per, c], centres [G, k, c])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(G, k, c, generator=g) * spread
    x = centres.repeat_interleave(per, 1) + noise * torch.randn(G, k * per, c, generator=g)
    return x, centres


def heavy(G=4, N=4096, c=8, seed=0):
    """Heavy-tailed data with per-channel scales, like LLM keys."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(G, N, c, generator=g) / (torch.randn(4, G, N, 1, generator=g).square().mean(0)).sqrt()
    return t * torch.exp(0.7 * torch.randn(G, 1, c, generator=g))


def nearest_ref(x, C):
    """Brute-force fp64 nearest centroid: x [G, N, c], C [G, K, c] -> (a [G, N], all distances [G, N, K] fp64)."""
    d = (x.double().unsqueeze(2) - C.double().unsqueeze(1)).square().sum(-1)
    return d.argmin(-1), d


def counts(x, C):
    """Points per centroid under nearest assignment: [G, K]."""
    a = ((x.unsqueeze(2) - C.unsqueeze(1)) ** 2).sum(-1).argmin(-1)
    return torch.stack([torch.bincount(a[i], minlength=C.shape[1]) for i in range(x.shape[0])])


def test_recovers_separated_clusters():
    x, centres = blobs()
    res = kmeans.fit(x, 8, iters=50, backend="torch")
    # the optimum is the blob means: every one has a fitted centroid on it; the objective is the noise variance
    means = x.view(3, 8, 100, 8).mean(2)
    d = torch.cdist(means, res.centroids).amin(-1)
    assert d.max() < 1e-4, d
    assert torch.allclose(res.objective, torch.full((3,), 8 * 0.25), rtol=0.1), res.objective
    assert res.centroids.shape == (3, 8, 8) and res.centroids.dtype == torch.float32
    assert res.backend == "torch" and res.seconds > 0
    assert len(res.history) == res.iterations >= 1


def test_objective_is_exact_and_history_decreases():
    x = heavy(G=3, N=2048)
    res = kmeans.fit(x, 32, iters=30, tol=0, backend="torch")
    exact = kmeans.objective(x, res.centroids)
    assert torch.allclose(res.objective, exact, rtol=1e-4), (res.objective, exact)
    assert res.history[-1] < res.history[0]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(res.history, res.history[1:])), res.history  # Lloyd is monotone
    assert math.isclose(res.history[-1], float(res.objective.double().mean()), rel_tol=1e-6)  # objective is fp32


def test_heavy_weight_gets_its_own_centroid():
    g = torch.Generator().manual_seed(1)
    # three tight clusters on a line and one stray point between two of them
    pts = torch.cat([torch.randn(100, 2, generator=g) * 0.3 + torch.tensor([x0, 0.0]) for x0 in (0.0, 10.0, 20.0)])
    stray = torch.tensor([[5.0, 4.0]])
    x = torch.cat([pts, stray]).unsqueeze(0)
    w = torch.ones(1, 301)
    plain = kmeans.fit(x, 3, iters=50, backend="torch", seed=0)
    w[0, -1] = 1e5
    heavy_w = kmeans.fit(x, 3, weights=w, iters=50, backend="torch", seed=0)
    d_plain = (plain.centroids[0] - stray).norm(dim=-1).min()
    d_heavy = (heavy_w.centroids[0] - stray).norm(dim=-1).min()
    assert d_plain > 3.0, plain.centroids  # unweighted: the stray point joins a cluster
    assert d_heavy < 0.01, heavy_w.centroids  # weighted: a centroid sits on it
    # and the weighted objective is the weighted mean: the stray point costs ~nothing, the merged pair a lot
    assert heavy_w.objective[0] < kmeans.objective(x, plain.centroids, w)[0]


def test_same_seed_same_result_other_seed_other_result():
    x = heavy(G=3, N=2048)
    a = kmeans.fit(x, 64, iters=20, seed=3, backend="torch")
    b = kmeans.fit(x, 64, iters=20, seed=3, backend="torch")
    c = kmeans.fit(x, 64, iters=20, seed=4, backend="torch")
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.objective, b.objective)
    assert a.history == b.history and a.iterations == b.iterations
    assert not torch.equal(a.centroids, c.centroids)


def test_empty_clusters_are_refilled(monkeypatch):
    # a seeding with one centroid on the data and the others far away: all clusters but one stay empty
    # until split, and each iteration can split every non-empty cluster once: 1 + 2 + 4 + 8 refills
    def collapsed(xs, ws, k, uni):
        far = torch.arange(k, dtype=torch.float32).view(1, k, 1) * 1e6
        return (xs[:, :1, :-2] + far).contiguous()

    monkeypatch.setattr(kmeans, "_kmeanspp", collapsed)
    x = heavy(G=2, N=1024)
    res = kmeans.fit(x, 16, iters=60, tol=0, backend="torch")
    assert res.refilled >= 2 * 15
    assert (counts(x, res.centroids) > 0).all()
    # and it still lands near a normally seeded run
    monkeypatch.undo()
    ref = kmeans.fit(x, 16, iters=60, tol=0, backend="torch")
    assert float(res.objective.mean()) < 1.1 * float(ref.objective.mean())


def test_fewer_points_than_centroids():
    x = torch.randn(2, 5, 4)
    res = kmeans.fit(x, 16, backend="torch")
    assert res.centroids.shape == (2, 16, 4)
    assert torch.all(res.objective == 0) and res.iterations == 0
    for g in range(2):  # every point is a centroid, the rest are repeats
        assert torch.equal(torch.unique(res.centroids[g], dim=0), torch.unique(x[g], dim=0))
    assert kmeans.fit(torch.randn(1, 16, 4), 16, backend="torch").objective.item() == 0


def test_early_stop_and_progress():
    x = heavy(G=4, N=2048)
    calls = []
    res = kmeans.fit(x, 32, iters=100, tol=1e-2, backend="torch", progress=lambda d, t: calls.append((d, t)))
    assert 1 < res.iterations < 100
    assert calls[-1] == (4 * 100, 4 * 100)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_chunked_over_groups_and_points_matches(monkeypatch):
    x = heavy(G=5, N=1024)
    whole = kmeans.fit(x, 32, iters=15, tol=0, backend="torch")
    monkeypatch.setattr(kmeans, "CPU_STATE_BYTES", kmeans._bytes_per_group(1024, 8, torch.device("cpu")) * 2)
    groups_chunked = kmeans.fit(x, 32, iters=15, tol=0, backend="torch")
    # the seeding draws are made for all groups before the chunking (which follows the free GPU memory on CUDA):
    # two groups per chunk give the same bits as all five at once
    assert torch.equal(groups_chunked.centroids, whole.centroids)
    monkeypatch.setattr(kmeans, "CPU_SCAN_ELEMS", 3000)  # distance blocks of a few points
    chunked = kmeans.fit(x, 32, iters=15, tol=0, backend="torch")
    # other matmul blocks may round a near tie the other way: compare quality rather than bits
    assert abs(float(chunked.objective.mean()) / float(whole.objective.mean()) - 1) < 0.03


def test_fp16_split_distances_match_fp32():
    """The CUDA path (fp16 hi/lo operands, fp16 output) picks the same centroids as fp32; run here on CPU.

    Hard case for it: points far from the group mean (|x| ~ 100) with many centroids within ~1 of each other,
    so rounding the operands to fp16 alone (error ~ 5e-4 |x| |C|) would scramble the assignment.
    """
    x, _ = blobs(G=3, k=16, per=128, spread=100.0, noise=1.0)
    xa, _ = kmeans._augment(x, torch.device("cpu"))
    C = xa[:, torch.randperm(2048, generator=torch.Generator().manual_seed(0))[:128], :-2].contiguous()
    cat = kmeans._aug_centroids(C)
    s = torch.exp2(torch.floor(torch.log2(torch.sqrt(kmeans.FP16_RANGE / xa[..., -2].amax(1)))))
    lhs, rhs = kmeans._half_operands(xa, None, s), kmeans._half_operands(xa, cat, s)
    assert lhs.dtype == rhs.dtype == torch.float16
    a32 = kmeans._nearest(xa, cat, 1 << 16)
    a16 = kmeans._nearest(lhs, rhs, 1 << 16)
    m = xa.shape[-1]
    a_hi = kmeans._nearest(lhs[..., :m].contiguous(), rhs[:, :m].contiguous(), 1 << 16)  # hi parts only

    def sse(a):
        return kmeans._dist2(xa[..., :-2], C, a).double().sum(1)

    assert (a16 == a32).float().mean() > 0.995
    assert torch.allclose(sse(a16), sse(a32), rtol=2e-5)
    assert (a_hi == a32).float().mean() < 0.9  # the lo parts are what makes it work


def test_fp16_path_lloyd_matches_fp32():
    x = heavy(G=3, N=2048)
    xa, _ = kmeans._augment(x, torch.device("cpu"))
    objs = []
    for half in (False, True):
        lloyd = kmeans._Lloyd(xa.clone(), None, 32, torch.Generator().manual_seed(0), half=half)
        lloyd.run(20, 0.0, None)
        objs.append(float(lloyd.out_obj.mean()))
    assert abs(objs[1] / objs[0] - 1) < 0.01, objs


def test_matches_faiss_objective():
    pytest.importorskip("faiss")
    x = heavy(G=4, N=4096, seed=2)
    ours = kmeans.fit(x, 64, iters=40, tol=0, backend="torch")
    theirs = kmeans.fit(x, 64, iters=40, tol=0, backend="faiss")
    assert theirs.backend.startswith("faiss") and theirs.centroids.shape == ours.centroids.shape
    rel = float(ours.objective.mean()) / float(theirs.objective.mean()) - 1
    assert abs(rel) < 0.01, rel
    w = torch.rand(4, 4096, generator=torch.Generator().manual_seed(5)) ** 4
    ours_w = kmeans.fit(x, 64, weights=w, iters=40, tol=0, backend="torch")
    theirs_w = kmeans.fit(x, 64, weights=w, iters=40, tol=0, backend="faiss")
    rel_w = float(ours_w.objective.mean()) / float(theirs_w.objective.mean()) - 1
    assert rel_w < 0.01, rel_w  # faiss seeds without the weights: ours may well be lower
    assert float(ours_w.objective.mean()) < float(kmeans.objective(x, ours.centroids, w).mean())


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: kmeans.fit(torch.randn(4, 8), 4), ["[G, N, c]", "[4, 8]"]),
        (lambda: kmeans.fit(torch.randint(0, 3, (1, 8, 2)), 4), ["float tensor"]),
        (lambda: kmeans.fit(torch.randn(1, 0, 2), 4), ["[1, 0, 2]"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 0), ["k", "0"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, iters=0), ["iters", "0"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, tol=-1.0), ["tol", "-1.0"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, backend="sklearn"), ["sklearn", "'torch'", "'faiss'", "'auto'"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, weights=torch.ones(1, 7)), ["weights", "[G=1, N=8]", "[1, 7]"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, weights=-torch.ones(1, 8)), ["weights", ">= 0"]),
        (lambda: kmeans.fit(torch.randn(2, 8, 2), 4, weights=torch.tensor([[1.0] * 8, [0.0] * 8])), ["group 1", "sum to 0"]),
        (lambda: kmeans.fit(torch.full((1, 8, 2), float("nan")), 4), ["NaN"]),
        (lambda: kmeans.fit(torch.randn(1, 8, 2), 4, device="tpu"), ["tpu"]),
        (lambda: kmeans.objective(torch.randn(2, 8, 2), torch.randn(2, 4, 3)), ["centroids", "[2, 4, 3]"]),
    ],
)
def test_bad_inputs_raise_config_error(call, words):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_import_does_not_import_faiss():
    import subprocess
    import sys

    code = "import sys, cqtool.kmeans, cqtool.bench_kmeans; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_synthetic_activations_are_heavy_tailed_and_seeded():
    from cqtool.bench_kmeans import synthetic_problem

    cpu = torch.device("cpu")
    k1 = synthetic_problem(3, "key", 256, 4096, 8, 0, cpu)
    assert k1.shape == (32, 4096, 8)
    assert torch.equal(k1, synthetic_problem(3, "key", 256, 4096, 8, 0, cpu))
    assert not torch.equal(k1, synthetic_problem(3, "value", 256, 4096, 8, 0, cpu))
    z = (k1 - k1.mean(1, keepdim=True)) / k1.std(1, keepdim=True)
    assert float((z**4).mean()) > 4.5  # kurtosis well above a Gaussian's 3
    rms = k1.square().mean(1).sqrt().flatten()
    assert float(rms.max() / rms.median()) > 5  # outlier channels


def test_bench_cli_tiny(tmp_path):
    from typer.testing import CliRunner

    from cqtool.cli import app

    out = tmp_path / "kmeans.json"
    args = ["bench", "kmeans", "--layers", "1", "--channels", "32", "--tokens", "1024", "--bits", "5", "--iters", "5",
            "--faiss-groups", "2", "--device", "cpu", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "torch s" in res.output and "rel diff" in res.output
    data = json.loads(out.read_text())
    assert data["problem"]["groups"] == 8 and data["problem"]["k"] == 32 and data["torch"]["seconds"] > 0
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert "faiss" not in data
    else:
        assert data["faiss"]["groups"] == 2 and abs(data["subset"]["rel_diff"]) < 0.2
    bad = CliRunner().invoke(app, ["bench", "kmeans", "--channels", "30", "--device", "cpu"])
    assert bad.exit_code == 2 and "divide channels=30" in bad.output and "Traceback" not in bad.output


@cuda
@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = heavy(G=8, N=8192)
    gpu = kmeans.fit(x, 256, iters=30, tol=0, backend="torch", device="cuda")
    assert gpu.centroids.is_cuda and gpu.objective.is_cuda and gpu.backend == "torch"
    cpu = kmeans.fit(x, 256, iters=30, tol=0, backend="torch", device="cpu")
    exact = kmeans.objective(x.cuda(), gpu.centroids)
    assert torch.allclose(gpu.objective, exact, rtol=1e-3)
    assert abs(float(gpu.objective.mean()) / float(cpu.objective.mean()) - 1) < 0.01
    assert kmeans.fit(x.cuda(), 256, iters=5, backend="auto").backend == "torch"


# ------------------------------------------------------------------------- fused Triton assignment kernel

TRITON_SHAPES = [(2, 300, 256, 8), (1, 130, 1024, 4), (1, 70, 4096, 2), (2, 129, 256, 16), (1, 200, 5, 8)]


def awkward(G, N, K, c, seed=0, device="cpu"):
    """Heavy-tailed points off centre and centroids drawn from them plus jitter: many close contenders."""
    g = torch.Generator().manual_seed(seed)
    x = heavy(G=G, N=N, c=c, seed=seed) * 10 + 3
    C = x[:, torch.randint(0, N, (K,), generator=g)] + 0.3 * torch.randn(G, K, c, generator=g)
    return x.to(device), C.to(device)


def check_nearest(x, C, a, d):
    """a [G, N] picks a nearest centroid up to a near-tie at fp32 precision; d is its distance."""
    ref, dist = nearest_ref(x, C)
    got = dist.gather(2, a.long().unsqueeze(-1)).squeeze(-1)
    best = dist.gather(2, ref.unsqueeze(-1)).squeeze(-1)
    # the kernel's rounding: ~2^-21 of |C|^2 + 2 |x| |C| <= 2 (|x|^2 + |C|^2), for the two centroids it compares
    cn = C.double().square().sum(-1)
    scale = x.double().square().sum(-1) + torch.maximum(cn.gather(1, ref), cn.gather(1, a.long()))
    assert a.dtype == torch.int32 and int(a.min()) >= 0 and int(a.max()) < C.shape[1]
    tol = 1e-6 * scale
    assert ((got - best) <= tol).all(), float(((got - best) / scale).max())
    clear = ((dist - best.unsqueeze(-1)) <= tol.unsqueeze(-1)).sum(-1) == 1  # no other centroid within tol
    assert clear.float().mean() > 0.5 and torch.equal(a.long()[clear], ref[clear])
    assert ((d.double() - best).abs() <= 4e-6 * scale).all()  # |x|^2 + min: fp32 sums (seen 1e-6 on an H100)


def fused_nearest(x, C):
    from cqtool import kmeans_triton as kt

    xc = x.float()
    a = torch.full(x.shape[:2], -7, dtype=torch.int32, device=x.device)  # poisoned: every entry must be written
    return kt.nearest(kt.point_operand(xc), kt.centroid_operand(C.float()), xc.square().sum(-1), out=a)


@pytest.fixture
def interpreted():
    # triton reads TRITON_INTERPRET when it is imported: test_triton_kernel_on_cpu runs these in a subprocess
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under TRITON_INTERPRET=1 only (test_triton_kernel_on_cpu starts it)")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")


def test_triton_kernel_on_cpu():
    """The kernel on CPU through Triton's interpreter: the *_interpreted tests, in a fresh process."""
    import subprocess
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize("G, N, K, c", TRITON_SHAPES)
def test_triton_nearest_matches_reference_interpreted(interpreted, G, N, K, c):
    x, C = awkward(G, N, K, c)
    a, d = fused_nearest(x, C)
    check_nearest(x, C, a, d)


def test_triton_lloyd_matches_bmm_path_interpreted(interpreted):
    x = heavy(G=2, N=600)
    xa, _ = kmeans._augment(x, torch.device("cpu"))
    runs = []
    for fused in (False, True):
        lloyd = kmeans._Lloyd(xa.clone(), None, 16, torch.Generator().manual_seed(0), half=False, fused=fused)
        lloyd.run(6, 0.0, None)
        assert (lloyd.kt is not None) == fused
        runs.append(lloyd)
    assert torch.equal(runs[0].a, runs[1].a)
    assert torch.allclose(runs[0].out_obj, runs[1].out_obj, rtol=1e-6)


def test_kernel_failure_falls_back_with_one_warning(monkeypatch):
    class Broken:
        point_operand = staticmethod(lambda xc: xc)
        centroid_operand = staticmethod(lambda C: C)

        @staticmethod
        def nearest(*args, **kw):
            raise RuntimeError("no kernel today")

    monkeypatch.setattr(kmeans, "_triton_kmeans", lambda: Broken)
    monkeypatch.setattr(kmeans, "_KERNEL_FAILED", False)
    x = heavy(G=2, N=512)
    xa, _ = kmeans._augment(x, torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="no kernel today") as rec:
        lloyd = kmeans._Lloyd(xa.clone(), None, 16, torch.Generator().manual_seed(0), half=False, fused=True)
        lloyd.run(5, 0.0, None)
    assert len([r for r in rec if "Triton" in str(r.message)]) == 1 and lloyd.kt is None and kmeans._KERNEL_FAILED
    ref = kmeans._Lloyd(xa.clone(), None, 16, torch.Generator().manual_seed(0), half=False, fused=False)
    ref.run(5, 0.0, None)
    assert torch.equal(lloyd.a, ref.a)


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, cqtool.kmeans, cqtool.bench_kmeans; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("G, N, K, c", TRITON_SHAPES + [(3, 40_000, 1024, 8), (2, 5000, 4096, 8)])
def test_triton_nearest_matches_reference_cuda(G, N, K, c):
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    x, C = awkward(G, N, K, c, device="cuda")
    a, d = fused_nearest(x, C)
    check_nearest(x, C, a, d)


@cuda
@pytest.mark.cuda
def test_cuda_fit_uses_the_fused_kernel():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    import warnings

    x = heavy(G=4, N=8192).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        fused = kmeans.fit(x, 256, iters=20, tol=0, backend="torch")
    xa, _ = kmeans._augment(x, x.device)
    bmm = kmeans._Lloyd(xa, None, 256, torch.Generator().manual_seed(0), half=True, fused=False)
    bmm.run(20, 0.0, None)
    assert abs(float(fused.objective.mean()) / float(bmm.out_obj.mean()) - 1) < 0.005
