"""The flatness toolkit against exact Hessians and materialised directions."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from flatlora_kernels import flatness
from flatlora_kernels.flatness.targets import patched_forwards

from .helpers import TinyMLP, randomize_lora_B

torch.set_default_dtype(torch.float32)


def tiny_mlp(n=6, hidden=5, out=3, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(TinyMLP(n, hidden, out), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    randomize_lora_B(model, std=0.3)
    x, y = torch.randn(16, n), torch.randn(16, out)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    return model, batches


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def exact_hessian_eigenvalues(model, batches):
    """eigvalsh of the Hessian of the mean loss w.r.t. the concatenated merged weights."""
    targets = flatness.merged_targets(model)
    merged = [t.merged() for t in targets]
    sizes = [m.numel() for m in merged]

    def loss_of(flat):
        pieces = torch.split(flat, sizes)
        weights = [p.view_as(m) for p, m in zip(pieces, merged)]

        def make(i, target):
            bias = target.parts()[1]
            return lambda x, *a, **k: F.linear(x, weights[i], bias)
        with patched_forwards(targets, make):
            return sum(mse(model, b) for b in batches) / len(batches)

    flat = torch.cat([m.flatten() for m in merged]).requires_grad_()
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    return torch.linalg.eigvalsh(hessian.double()).flip(0)


def quadratic_model(seed=1):
    """A linear layer under MSE: the loss is an exact quadratic in the merged weights."""
    torch.manual_seed(seed)
    model = get_peft_model(TinyMLP(7, 1, bias=False), LoraConfig(r=2, lora_alpha=2, target_modules=["fc1"]))
    x = torch.randn(20, 7) * torch.linspace(0.2, 2.0, 7)  # distinct curvatures
    return model, [(x, torch.randn(20, 1))]


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("make", [quadratic_model, tiny_mlp], ids=["quadratic", "tiny-network"])
def test_top_eigenvalues_match_eigvalsh(method, make):
    model, batches = make()
    exact = exact_hessian_eigenvalues(model, batches)
    # power: relative change of the Rayleigh quotient; lanczos: Ritz residual bound, limited by fp32 HVPs
    tol = 1e-7 if method == "power" else 1e-3
    result = flatness.top_eigenvalues(model, mse, batches, k=3, method=method, max_iter=300, tol=tol,
                                      progress=False)
    assert result.dimension == exact.numel()
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), exact[:3], rtol=2e-3, atol=1e-5)
    assert all(result.converged)


def test_spectral_density_integrates_to_one_and_matches_moments():
    model, batches = tiny_mlp()
    exact = exact_hessian_eigenvalues(model, batches)
    d = exact.numel()
    result = flatness.spectral_density(model, mse, batches, num_probes=64, lanczos_steps=d, seed=3, progress=False)
    grid, density = torch.tensor(result.grid), torch.tensor(result.density)
    assert abs(torch.trapezoid(density, grid).item() - 1.0) < 1e-3
    assert all(abs(sum(w) - 1.0) < 1e-6 for w in result.weights)
    for power in (1, 2):
        estimate = sum(sum(w * x**power for w, x in zip(ws, xs))
                       for ws, xs in zip(result.weights, result.nodes)) / result.num_probes
        true = (exact**power).mean().item()
        # Hutchinson with 64 Rademacher probes: a few standard errors of the trace estimate
        assert abs(estimate - true) <= 0.15 * abs(true) + 1e-6, (power, estimate, true)


def test_surface_at_zero_is_the_plain_loss_and_equals_materialised_directions():
    model, batches = tiny_mlp()
    model.eval()
    with torch.no_grad():
        plain = sum(mse(model, b) for b in batches).item() / len(batches)
    surface = flatness.loss_surface(model, mse, batches, seeds=[11], alphas=[-0.5, 0.0, 0.3], progress=False)
    assert surface.base_loss == pytest.approx(plain, rel=1e-6)
    assert surface.losses[1][0] == pytest.approx(plain, rel=1e-6)
    directions = flatness.materialised_direction(model, 11)
    targets = flatness.merged_targets(model)
    for alpha, (loss,) in zip(surface.alphas, surface.losses):
        weights = [t.merged() + alpha * d for t, d in zip(targets, directions)]
        with torch.no_grad(), patched_forwards(targets, lambda i, t: (lambda x, *a, **k: F.linear(x, weights[i], t.parts()[1]))):
            expected = sum(mse(model, b) for b in batches).item() / len(batches)
        assert loss == pytest.approx(expected, rel=1e-5)
    assert surface.losses[0][0] != pytest.approx(plain, rel=1e-3)  # the direction does move the loss


def test_two_dimensional_surface_equals_materialised():
    model, batches = tiny_mlp()
    surface = flatness.loss_surface(model, mse, batches, seeds=[1, 2], alphas=[0.2], betas=[-0.4, 0.0],
                                    progress=False)
    d1, d2 = flatness.materialised_direction(model, 1), flatness.materialised_direction(model, 2)
    targets = flatness.merged_targets(model)
    model.eval()
    for beta, loss in zip(surface.betas, surface.losses[0]):
        weights = [t.merged() + 0.2 * a + beta * b for t, a, b in zip(targets, d1, d2)]
        with torch.no_grad(), patched_forwards(targets, lambda i, t: (lambda x, *a, **k: F.linear(x, weights[i], t.parts()[1]))):
            expected = sum(mse(model, b) for b in batches).item() / len(batches)
        assert loss == pytest.approx(expected, rel=1e-5)


def test_epsilon_sharpness_is_positive_and_grows():
    model, batches = tiny_mlp()
    with torch.no_grad():
        plain = sum(mse(model, b) for b in batches).item() / len(batches)
    values = [flatness.epsilon_sharpness(model, mse, batches, eps, steps=5, progress=False) for eps in (1e-3, 1e-2, 5e-2)]
    # the ascent starts where the gradient is non-zero, so even the smallest box raises the loss
    assert 0 < values[0].increase < values[1].increase < values[2].increase
    for v in values:
        assert v.base_loss == pytest.approx(plain, rel=1e-6)
        assert v.increase == pytest.approx(v.max_loss - plain, rel=1e-6)
        assert v.keskar == pytest.approx(100 * (v.max_loss - plain) / (1 + plain), rel=1e-6)  # Keskar et al.'s scale


def test_noisy_loss_at_zero_sigma_is_the_plain_loss():
    model, batches = tiny_mlp()
    result = flatness.noisy_loss(model, mse, batches, sigmas=[0.0, 0.5], num_samples=3, progress=False)
    assert result.mean[0] == pytest.approx(result.base_loss, rel=1e-6) and result.std[0] == 0.0
    assert result.mean[1] != pytest.approx(result.base_loss, rel=1e-3)


def test_deterministic_for_a_seed():
    model, batches = tiny_mlp()
    a = flatness.top_eigenvalues(model, mse, batches, k=1, max_iter=5, seed=4, progress=False)
    b = flatness.top_eigenvalues(model, mse, batches, k=1, max_iter=5, seed=4, progress=False)
    assert a == b


@pytest.mark.parametrize("call,error,match", [
    (lambda m, b: flatness.top_eigenvalues(m, mse, b, k=0), ValueError, "k must be"),
    (lambda m, b: flatness.top_eigenvalues(m, mse, b, max_iter=0), ValueError, "max_iter"),
    (lambda m, b: flatness.top_eigenvalues(m, mse, b, method="qr"), ValueError, "method"),
    (lambda m, b: flatness.epsilon_sharpness(m, mse, b, -0.1), ValueError, "epsilon"),
    (lambda m, b: flatness.epsilon_sharpness(m, mse, b, 0.1, steps=0), ValueError, "steps"),
    (lambda m, b: flatness.spectral_density(m, mse, b, num_probes=0), ValueError, "num_probes"),
    (lambda m, b: flatness.loss_surface(m, mse, b, seeds=[1, 2], alphas=[0.1]), ValueError, "seeds"),
    (lambda m, b: flatness.noisy_loss(m, mse, b, sigmas=[-1.0]), ValueError, "sigmas"),
    (lambda m, b: flatness.top_eigenvalues(m, mse, []), ValueError, "batches is empty"),
    (lambda m, b: flatness.top_eigenvalues(torch.nn.Sequential(torch.nn.Linear(6, 3)), mse, b), ValueError,
     "no LoRA linear layers"),
    (lambda m, b: flatness.top_eigenvalues(m, lambda model, batch: model(batch[0]), b), TypeError, "scalar"),
])
def test_bad_arguments(call, error, match):
    model, batches = tiny_mlp()
    with pytest.raises(error, match=match):
        call(model, batches)


def test_loss_plane_corners_are_the_three_models():
    model, batches = tiny_mlp()
    trained = flatness.lora_point(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
    other = flatness.lora_point(model)
    plane = flatness.loss_plane(model, mse, batches, [None, trained, other], alphas=[0.0, 1.0], betas=[0.0, 1.0],
                                progress=False)
    model.eval()
    with torch.no_grad():
        loss_other = sum(mse(model, b) for b in batches).item() / len(batches)
        with model.disable_adapter():
            loss_base = sum(mse(model, b) for b in batches).item() / len(batches)
    assert plane.corner_losses[0] == pytest.approx(loss_base, rel=1e-5)
    assert plane.corner_losses[2] == pytest.approx(loss_other, rel=1e-5)
    assert plane.losses[0][0] == pytest.approx(loss_base, rel=1e-5)
    assert plane.losses[1][0] == pytest.approx(plane.corner_losses[1], rel=1e-5)
    with pytest.raises(ValueError, match="three points"):
        flatness.loss_plane(model, mse, batches, [None, trained], [0.0], [0.0])


def test_plots_are_written(tmp_path):
    model, batches = tiny_mlp()
    s1 = flatness.loss_surface(model, mse, batches, seeds=[1], alphas=[-0.2, 0.0, 0.2], progress=False)
    s2 = flatness.loss_surface(model, mse, batches, seeds=[1, 2], alphas=[-0.2, 0.2], betas=[-0.2, 0.2],
                               progress=False)
    dens = flatness.spectral_density(model, mse, batches, num_probes=2, lanczos_steps=5, progress=False)
    flatness.plot_surfaces_1d({"lora": s1}, tmp_path / "s1.png")
    flatness.plot_surface_2d(s2, tmp_path / "s2.pdf")
    flatness.plot_densities({"lora": dens}, tmp_path / "d.png")
    for name in ("s1.png", "s2.pdf", "d.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_command_line_on_saved_adapters(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path


    for seed, name in ((0, "a"), (1, "b")):
        model, _ = tiny_mlp(seed=0)
        torch.manual_seed(seed)
        randomize_lora_B(model, std=0.3)
        model.save_pretrained(tmp_path / name)
    task = Path(__file__).with_name("flatness_task_tiny.py")
    proc = subprocess.run([sys.executable, "-m", "flatlora_kernels.flatness", "--task", str(task),
                           "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"),
                           "--out", str(tmp_path / "out"), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "flatness.json").read_text())
    assert {"a", "b", "plane"} <= report.keys()
    for name in ("surface1d.png", "density.png", "plane.png", "surface2d-a.png"):
        assert (tmp_path / "out" / name).exists()


def test_importing_the_toolkit_loads_no_plotting_or_command_line_code():
    """matplotlib is imported only when a figure is drawn, the argument parser only by ``-m``."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, flatlora_kernels.flatness as f; f.top_eigenvalues; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
            "or m == 'flatlora_kernels.flatness.__main__'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    assert callable(flatness.main)  # still there, loaded on first access
    library = [p for p in Path(flatness.__file__).parent.glob("*.py") if p.name != "__main__.py"]
    assert {p.stem for p in library} == {"__init__", "targets", "curvature", "surfaces", "plots"}
    for path in library:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert "argparse" not in imported, path.name


# ------------------------------------------------- block Lanczos, median dominant eigenvalue, outliers
def quadratic_with_spectrum(eigenvalues, seed=2):
    """A linear layer under MSE whose Hessian w.r.t. its weight has exactly ``eigenvalues``:
    the loss is mean((x·w - y)^2), Hessian 2/N XᵀX, so X = sqrt(N/2) Q diag(sqrt(λ)) Rᵀ."""
    generator = torch.Generator().manual_seed(seed)
    n, count = len(eigenvalues), 4 * len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(count, n, generator=generator, dtype=torch.float64))
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    x = (count / 2) ** 0.5 * q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64).sqrt()) @ rotation.T
    torch.manual_seed(seed)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(n, 1, bias=False)),
                           LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    return model, [(x.float(), torch.randn(count, 1, generator=generator))]


def twin_network(seed=0):
    """Two identical tiny networks side by side, each with its own LoRA layers and the same data: the
    Hessian is block diagonal with two equal blocks, so every eigenvalue appears exactly twice."""
    torch.manual_seed(seed)
    one = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    twin = torch.nn.ModuleDict({"a": one, "b": __import__("copy").deepcopy(one)})
    model = get_peft_model(twin, LoraConfig(r=1, lora_alpha=2, target_modules=["a.0", "a.2", "b.0", "b.2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".a." in name:
                p.normal_(std=0.3)
        for (name, p), (_, q) in zip(model.base_model.model["a"].named_parameters(),
                                     model.base_model.model["b"].named_parameters()):
            q.copy_(p)
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    return model, [(x, y)]


def twin_mse(model, batch):
    x, y = batch
    inner = model.base_model.model
    return F.mse_loss(inner["a"](x), y) + F.mse_loss(inner["b"](x), y)


def exact_eigenvalues_of(model, loss_fn, batches):
    targets = flatness.merged_targets(model)
    merged = [t.merged() for t in targets]
    sizes = [m.numel() for m in merged]

    def loss_of(flat):
        weights = [p.view_as(m) for p, m in zip(torch.split(flat, sizes), merged)]
        with patched_forwards(targets, lambda i, t: (lambda x, *a, **k: F.linear(x, weights[i], t.parts()[1]))):
            return sum(loss_fn(model, b) for b in batches) / len(batches)

    flat = torch.cat([m.flatten() for m in merged]).requires_grad_()
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat).double()).flip(0)


@pytest.mark.parametrize("make", [quadratic_model, tiny_mlp], ids=["quadratic", "tiny-network"])
@pytest.mark.parametrize("block_size", [1, 3])
def test_block_lanczos_matches_eigvalsh(make, block_size):
    model, batches = make()
    exact = exact_hessian_eigenvalues(model, batches)
    result = flatness.top_eigenvalues(model, mse, batches, k=3, method="block_lanczos", block_size=block_size,
                                      max_iter=exact.numel() + block_size, tol=1e-3, progress=False)
    assert result.method == "block_lanczos" and result.iterations[0] <= exact.numel()
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), exact[:3], rtol=2e-3, atol=1e-5)
    assert all(result.converged)


def test_block_lanczos_finds_the_multiplicity_that_lanczos_misses_on_a_quadratic():
    spectrum = [6.0, 6.0, 6.0] + torch.linspace(0.05, 1.0, 37).tolist()
    model, batches = quadratic_with_spectrum(spectrum)
    exact = exact_hessian_eigenvalues(model, batches)
    torch.testing.assert_close(exact[:4], torch.tensor([6.0, 6.0, 6.0, 1.0], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    block = flatness.top_eigenvalues(model, mse, batches, k=3, method="block_lanczos", block_size=3, max_iter=24,
                                     tol=1e-3, progress=False)
    torch.testing.assert_close(torch.tensor(block.eigenvalues, dtype=torch.float64), exact[:3], rtol=1e-3, atol=1e-4)
    assert all(block.converged)
    single = flatness.top_eigenvalues(model, mse, batches, k=3, method="lanczos", max_iter=4, progress=False)
    assert single.eigenvalues[0] == pytest.approx(6.0, rel=1e-3)
    # in exact arithmetic the other two copies are outside its Krylov space; within a few steps fp32
    # rounding has not yet grown them back
    assert max(single.eigenvalues[1:]) < 1.01


def test_block_lanczos_finds_the_doubled_spectrum_of_a_twin_network():
    model, batches = twin_network()
    exact = exact_eigenvalues_of(model, twin_mse, batches)
    torch.testing.assert_close(exact[0], exact[1], rtol=1e-4, atol=1e-6)  # the construction: pairs
    assert exact[2] < 0.9 * exact[0]
    block = flatness.top_eigenvalues(model, twin_mse, batches, k=4, method="block_lanczos", block_size=2,
                                     max_iter=exact.numel(), tol=1e-3, progress=False)
    torch.testing.assert_close(torch.tensor(block.eigenvalues, dtype=torch.float64), exact[:4], rtol=2e-3, atol=1e-5)
    # 14 steps: fewer than the 18 distinct eigenvalues, so the Krylov space is not yet exhausted (after
    # that, Lanczos goes on from rounding noise and may pick the copies up)
    single = flatness.top_eigenvalues(model, twin_mse, batches, k=2, method="lanczos", max_iter=14, progress=False)
    assert single.eigenvalues[0] == pytest.approx(float(exact[0]), rel=2e-3)
    assert single.eigenvalues[1] == pytest.approx(float(exact[2]), rel=2e-3)  # the twin copy is missed


def test_median_dominant_eigenvalue_is_the_median_of_per_batch_exact_values():
    model, _ = tiny_mlp()
    x, y = torch.randn(15, 6, generator=torch.Generator().manual_seed(5)), torch.randn(15, 3)
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 15, 5)]
    exact = [float(exact_hessian_eigenvalues(model, [b])[0]) for b in batches]
    for method in ("power", "lanczos"):
        result = flatness.median_dominant_eigenvalue(model, mse, batches, method=method, max_iter=200, tol=1e-6,
                                                     progress=False)
        torch.testing.assert_close(torch.tensor(result.values), torch.tensor(exact), rtol=2e-3, atol=1e-5)
        assert result.median == pytest.approx(sorted(exact)[1], rel=2e-3)
        assert len(set(round(v, 4) for v in result.values)) == 3  # per-batch values, not the mean loss's
        assert result.method == method and all(result.converged)


def test_eigenvalue_outliers_count_the_isolated_eigenvalues():
    bulk = torch.linspace(0.0, 1.0, 297).tolist()  # three outliers of 300 eigenvalues: 1% of the mass
    model, batches = quadratic_with_spectrum([9.0, 7.0, 5.0] + bulk)
    density = flatness.spectral_density(model, mse, batches, num_probes=8, lanczos_steps=30, seed=1, progress=False)
    outliers = flatness.eigenvalue_outliers(density)
    assert outliers.count == 3 and len(outliers.per_probe) == 8
    assert 0.0 <= outliers.bulk_low < outliers.bulk_high <= 1.05
    for probe in outliers.values:
        if len(probe) == 3:
            torch.testing.assert_close(torch.tensor(probe), torch.tensor([9.0, 7.0, 5.0]), rtol=1e-3, atol=1e-3)
    model, batches = quadratic_with_spectrum(bulk)
    none = flatness.eigenvalue_outliers(flatness.spectral_density(model, mse, batches, num_probes=4, lanczos_steps=30,
                                                                  progress=False))
    assert none.count == 0
    with pytest.raises(ValueError, match="tail"):
        flatness.eigenvalue_outliers(density, tail=0.5)
    with pytest.raises(ValueError, match="gap"):
        flatness.eigenvalue_outliers(density, gap=-1.0)


@pytest.mark.parametrize("call,match", [
    (lambda m, b: flatness.top_eigenvalues(m, mse, b, method="block_lanczos", block_size=0), "block_size"),
    (lambda m, b: flatness.top_eigenvalues(m, mse, b, method="block_lanczos", block_size=4, max_iter=3),
     "max_iter >= block_size"),
    (lambda m, b: flatness.median_dominant_eigenvalue(m, mse, [], progress=False), "batches is empty"),
    (lambda m, b: flatness.median_dominant_eigenvalue(m, mse, b, method="qr", progress=False), "method"),
])
def test_bad_arguments_of_the_new_measures(call, match):
    model, batches = tiny_mlp()
    with pytest.raises(ValueError, match=match):
        call(model, batches)
