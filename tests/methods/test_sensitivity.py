import torch
from torch import nn

from genaf.methods.sensitivity import robust_sensitivity, select_redundant, weight_units


class TwoPath(nn.Module):
    """``live`` decides the output; ``dead``'s output is multiplied by zero, so no
    perturbation of its weights can change the loss."""

    def __init__(self):
        super().__init__()
        self.live = nn.Linear(4, 3)
        self.dead = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.live(x)) + 0.0 * self.dead(x)


def test_dead_layer_scores_zero_and_is_selected_first():
    torch.manual_seed(0)
    model = TwoPath().train()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = robust_sensitivity(model, x, y, eta=0.1, steps=5)
    assert set(scores) == {"live", "dead"}
    assert scores["dead"] == 0.0
    assert scores["live"] > 1e-3  # a 10 % weight perturbation raises the loss
    assert select_redundant(scores, 1) == ["dead"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored bit-exactly
    assert model.training and model.drop.training  # modes restored


def test_scores_are_deterministic_and_grow_with_eta():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    a = robust_sensitivity(model, x, y, eta=0.05, steps=4, seed=3)
    b = robust_sensitivity(model, x, y, eta=0.05, steps=4, seed=3)
    c = robust_sensitivity(model, x, y, eta=0.2, steps=4, seed=3)
    assert a == b
    assert all(c[k] >= a[k] for k in a) and all(v >= 0 for v in a.values())
    assert list(weight_units(model)) == ["0", "2"]


def test_steps_are_a_full_radius_long_and_end_on_the_boundary():
    """One step of the default length is the whole radius along the normalised gradient
    (ρ = L(W + η‖W‖·ĝ) − L(W), computed here by hand); a step of half the radius reaches only
    L(W + η‖W‖·ĝ/2), and two half steps along turning gradients end inside the ball."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(96, 5), torch.randint(0, 3, (96,))
    w = model[0].weight
    w0 = w.detach().clone()
    r = 0.1 * float(w0.norm())
    w.requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), w)[0]
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
        w.copy_(w0 + r * g / g.norm())
        full = float(F.cross_entropy(model(x), y)) - base
        w.copy_(w0 + 0.5 * r * g / g.norm())
        half = float(F.cross_entropy(model(x), y)) - base
        w.copy_(w0)
    scores = robust_sensitivity(model, x, y, eta=0.1, steps=1)
    assert abs(scores["0"] - full) < 1e-5 and full > half > 0
    assert abs(robust_sensitivity(model, x, y, eta=0.1, steps=1, step_size=0.5)["0"] - half) < 1e-5
    # more full-radius steps re-aim along the boundary: never below the first step's loss
    assert robust_sensitivity(model, x, y, eta=0.1, steps=3)["0"] >= full - 1e-6
    assert torch.equal(w.detach(), w0)


# ------------------------------------------------------------------ the prefix cache
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Chain(nn.Module):
    """stem -> blocks (a homogeneous list, as a ViT's) -> head; ``skip_from`` adds block 0's
    output to the head's input, which breaks the chain (a later block is not fed by its
    predecessor alone)."""

    def __init__(self, d=8, depth=4, skip_from=False):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 3)
        self.skip_from = skip_from

    def forward(self, x):
        x = self.stem(x)
        first = None
        for i, b in enumerate(self.blocks):
            x = b(x)
            first = x if i == 0 else first
        return self.head(x + (first if self.skip_from else 0))


def test_prefix_cache_gives_the_scores_of_full_passes_on_the_demo_resnet_and_vit():
    from genaf.encoders import load_encoder
    from genaf.methods.sensitivity import PrefixCache
    from genaf.models import DownstreamModel

    torch.manual_seed(0)
    for spec, chain in (("demo", 8), ("demo-vit", 4)):
        model = DownstreamModel(load_encoder(spec), 10).eval()
        x, y = torch.rand(48, 1, 28, 28), torch.randint(0, 10, (48,))
        cache = PrefixCache(model, x, 16)
        assert cache.active and len(cache.blocks) == chain and sorted(cache.kept) == list(range(chain))
        kw = dict(eta=0.1, steps=2, ascent_fraction=0.5, batch_size=16)
        full = robust_sensitivity(model, x, y, prefix_cache=False, **kw)
        cached = robust_sensitivity(model, x, y, **kw)
        assert full == cached, spec  # the same arithmetic, bit for bit
        assert max(full.values()) > 0


def test_prefix_cache_refuses_a_broken_chain_and_keeps_every_kth_block_under_a_budget():
    from genaf.methods.sensitivity import PrefixCache

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    good = Chain().eval()
    assert PrefixCache(good, x, 16).active
    # a budget for about half the blocks: every second block's output is kept
    small = PrefixCache(good, x, 16, budget=40 * 8 * 4 * 2)
    assert small.active and sorted(small.kept) == [1, 3]
    broken = Chain(skip_from=True).eval()
    broken.load_state_dict(good.state_dict())
    lines = []
    cache = PrefixCache(broken, x, 16, log=lines.append)
    assert not cache.active and "changes the model's output" in cache.reason and lines
    kw = dict(eta=0.2, steps=2, ascent_fraction=0.5, batch_size=16)
    for model in (good, broken):  # scores equal full passes whether the cache is used or refused
        assert robust_sensitivity(model, x, y, **kw) == robust_sensitivity(model, x, y, prefix_cache=False, **kw)
