"""Batched weighted k-means (cqtool.kmeans): recovery, weights, determinism, empty clusters, N < k, faiss parity,
the fp16 distance path CUDA uses, chunking, input errors, a CUDA run; and `cqtool bench kmeans` at a tiny size."""
import json
import math

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
    monkeypatch.setattr(kmeans, "CPU_SCAN_ELEMS", 3000)  # distance blocks of a few points
    chunked = kmeans.fit(x, 32, iters=15, tol=0, backend="torch")
    # the seeding draws per chunk differ, so compare quality rather than bits
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
