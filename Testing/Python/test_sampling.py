"""sampling.grid_sample: the points split across threads give torch's own samples, bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from InverseRegLib import sampling


@pytest.fixture(params=[2, 3])
def threads(request, monkeypatch):
    """Several torch threads (the suite runs on one), and a split even for small test grids."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(sampling, "MIN_POINTS_TO_SPLIT", 1)
    yield request.param
    torch.set_num_threads(before)


def _reference(volume, grid, mode, padding_mode):
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode,padding_mode", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_same_samples_as_torch(threads, channels, mode, padding_mode, monkeypatch):
    generator = torch.Generator().manual_seed(channels)
    volume = torch.rand(1, channels, 9, 11, 13, generator=generator)
    # 7 * 5 * 4 = 140 points, which 2 threads divide and 3 do not; reaching outside the volume
    # so that the padding modes matter
    grid = torch.rand(1, 7, 5, 4, 3, generator=generator) * 2.4 - 1.2
    batches = []
    torch_grid_sample = F.grid_sample

    def recording(volume, grid, **options):
        batches.append(grid.shape[0])
        return torch_grid_sample(volume, grid, **options)

    with monkeypatch.context() as patch:  # torch.nn.functional itself: restored before the reference
        patch.setattr(F, "grid_sample", recording)
        out = sampling.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode)
    # one call on every thread; the points the threads do not divide evenly in a second, small one
    assert batches[0] == threads and len(batches) == (1 if 140 % threads == 0 else 2), batches
    assert out.shape == (1, channels, 7, 5, 4)
    assert torch.equal(out, _reference(volume, grid, mode, padding_mode))


def test_point_list_and_channels_last_view(threads):
    """The shapes the inverse uses: points as (1, 1, 1, N, 3), the field a permuted view."""
    generator = torch.Generator().manual_seed(7)
    field = torch.rand(10, 12, 14, 3, generator=generator)
    volume = field.permute(3, 0, 1, 2)[None]  # (1, 3, D, H, W), not contiguous
    grid = torch.rand(1, 1, 1, 1001, 3, generator=generator) * 2 - 1
    out = sampling.grid_sample(volume, grid, padding_mode="border")
    assert torch.equal(out, _reference(volume, grid, "bilinear", "border"))


def test_gradients_still_flow(threads):
    """Training samples with autograd: that path is torch's own call, gradients included."""
    volume = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    grid = torch.rand(1, 6, 6, 6, 3) * 2 - 1
    sampling.grid_sample(volume, grid).sum().backward()
    expected = torch.autograd.grad(_reference(volume, grid, "bilinear", "zeros").sum(), volume)[0]
    assert torch.equal(volume.grad, expected)


def test_batches_are_left_to_torch(threads):
    volume = torch.rand(2, 1, 5, 5, 5)
    grid = torch.rand(2, 4, 4, 4, 3) * 2 - 1
    assert torch.equal(sampling.grid_sample(volume, grid), _reference(volume, grid, "bilinear", "zeros"))
